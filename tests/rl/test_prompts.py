"""rl.prompts: prompt batches from every prompt-bearing format, resumable order, global arrays."""

from __future__ import annotations

import json

import jax
import numpy as np

from jaxrlhf import data, sharding
from jaxrlhf.rl import prompts as pl

ROWS = [{"prompt": f"What is {i} + {i % 3}?", "answer": str(i + i % 3), "level": i % 2} for i in range(12)]


def _write(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def test_plain_prompts_keep_text_and_columns_and_resume(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    cfg = data.DataConfig(path=_write(tmp_path / "p.jsonl", ROWS), max_length=64, batch_size=4, seed=3)
    loader = pl.build_prompt_loader(cfg, tok)
    first = next(loader)
    for b, i in enumerate(first.index):
        want = list(tok.prefix_ids) + tok.encode(ROWS[i]["prompt"])
        row = np.asarray(first.prompt_ids[b])[np.asarray(first.prompt_mask[b]) > 0]
        assert row.tolist() == want and np.asarray(first.prompt_mask[b])[-1] == 1  # left-padded
        assert first.prompts[b] == ROWS[i]["prompt"] and first.columns["answer"][b] == ROWS[i]["answer"]
    assert "prompt" not in first.columns and first.columns["level"] == [ROWS[i]["level"] for i in first.index]
    assert first.prompt_ids.shape[1] in loader.dataset.buckets and first.messages == [None] * 4
    state = loader.state()
    rest = [next(loader).index.tolist() for _ in range(3)]
    again = pl.build_prompt_loader(cfg, tok)
    again.restore(state)
    assert [next(again).index.tolist() for _ in range(3)] == rest
    assert sorted(first.index.tolist() + rest[0] + rest[1]) == list(range(12))  # one epoch, shuffled
    assert first.index.tolist() + rest[0] != list(range(8))


def test_chat_and_preference_prompts_through_the_template(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    chat = [
        {
            "messages": [
                {"role": "user", "content": r["prompt"]},
                {"role": "assistant", "content": r["answer"]},
            ]
        }
        for r in ROWS[:4]
    ]
    cfg = data.DataConfig(path=_write(tmp_path / "c.jsonl", chat), max_length=64, batch_size=4, shuffle=False,
                          template="chatml")  # fmt: skip
    batch = next(pl.build_prompt_loader(cfg, tok))
    for b in range(4):
        user = [chat[b]["messages"][0]]
        row = np.asarray(batch.prompt_ids[b])[np.asarray(batch.prompt_mask[b]) > 0].tolist()
        assert row == data.tokenize_chat_prompt(tok, user)
        assert batch.messages[b] == user and batch.prompts[b] == ROWS[b]["prompt"]
    prefs = [{"prompt": r["prompt"], "chosen": "yes", "rejected": "no"} for r in ROWS[:4]]
    cfg = data.DataConfig(
        path=_write(tmp_path / "r.jsonl", prefs), max_length=64, batch_size=4, shuffle=False
    )
    batch = next(pl.build_prompt_loader(cfg, tok, encoder_decoder=True))
    for b in range(4):
        row = np.asarray(batch.prompt_ids[b])[np.asarray(batch.prompt_mask[b]) > 0].tolist()
        assert row == list(tok.prefix_ids) + tok.encode(ROWS[b]["prompt"]) + [tok.eos_token_id]  # T5: + EOS
    assert batch.columns["chosen"] == ["yes"] * 4


def test_global_arrays_on_a_mesh(tmp_path, tiny_tokenizer):
    mesh = sharding.make_mesh(data=8)
    cfg = data.DataConfig(path=_write(tmp_path / "p.jsonl", ROWS), max_length=64, batch_size=8, shuffle=False)
    batch = next(pl.build_prompt_loader(cfg, tiny_tokenizer, mesh=mesh))
    assert isinstance(batch.prompt_ids, jax.Array) and len(batch.prompt_ids.sharding.device_set) == 8
    np.testing.assert_array_equal(pl.local_rows(batch.prompt_ids), np.arange(8))
    assert pl.host_array(batch.prompt_ids).shape == batch.prompt_ids.shape
    terms = pl.to_global(np.arange(8, dtype=np.float32)[:, None], mesh)
    assert terms.shape == (8, 1) and terms.sharding == sharding.batch_sharding(mesh, 2)
