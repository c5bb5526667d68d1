"""The reward-model stage on the bundled tiny comparisons, from a short tiny SFT stage, on 8 fake CPU devices.

The RM must learn the raters' preferences (held-out accuracy >= 0.9 on the noisy labels, and agreement with
the task's ground-truth rule on both politeness and arithmetic correctness), leave a stage checkpoint whose
reward head, statistics and per-pair rewards agree with one another and with a fresh scoring pass, export a
HF LlamaForSequenceClassification that transformers scores identically, train a LoRA reward adapter over the
shared base, and report bad preference rows by row.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from jaxrlhf import data, lora, reward_model, sharding, train
from jaxrlhf.assets import tiny
from jaxrlhf.stages import rm
from tests.stages._tiny_stages import RM_STEPS, rm_config

PREFS = tiny.asset_path("prefs.jsonl")


@pytest.fixture(scope="module")
def sft_stage(tiny_sft) -> str:
    return tiny_sft.stage_dir  # tests/stages/conftest.py: the session's short tiny SFT stage


def _rm_config(out, sft_stage, tmp_path_factory, *extra: str) -> rm.RMConfig:
    return rm_config(out, sft_stage, tmp_path_factory, *extra)


@pytest.fixture(scope="module")
def full_run(tiny_rm):
    return tiny_rm  # the tiny RM config (RM_STEPS) on that stage, shared with the RL stage tests


def _read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _eval_pairs(run_dir):
    rewards = _read_jsonl(os.path.join(run_dir, "eval_rewards.jsonl"))
    rows = _read_jsonl(PREFS)
    return rewards, [rows[r["index"]] for r in rewards]


def test_held_out_accuracy(full_run):
    first, last = full_run.first_eval, full_run.eval_metrics
    assert last["loss"] < first["loss"] - 0.2 and last["margin"] > first["margin"] + 1.0, (first, last)
    # noisy labels: 5% of the bundled pairs are flipped on purpose (13 of these 200), so 0.935 is the ceiling
    assert last["accuracy"] >= 0.9, last
    rewards, rows = _eval_pairs(full_run.run_dir)
    assert len(rewards) == 200  # eval_fraction 0.1 of 2000 pairs, every one scored once
    # against the ground-truth rule (which the RM never sees): pairs that differ in style, and pairs of one
    # style that differ only in arithmetic correctness (a right answer against the other operation's result)
    by_style, by_correctness = [], []
    for r, row in zip(rewards, rows, strict=True):
        sc, sr = tiny.check(row["prompt"], row["chosen"]), tiny.check(row["prompt"], row["rejected"])
        right = (r["r_chosen"] > r["r_rejected"]) == (sc > sr)
        if tiny.is_polite(row["chosen"]) != tiny.is_polite(row["rejected"]):
            by_style.append(right)
        else:
            by_correctness.append(right)
    assert len(by_correctness) >= 50, len(by_correctness)
    assert np.mean(by_style) >= 0.98, np.mean(by_style)
    assert np.mean(by_correctness) >= 0.9, np.mean(by_correctness)
    assert np.mean(by_style + by_correctness) >= 0.95
    records = train.read_jsonl(os.path.join(full_run.run_dir, "metrics.jsonl"))
    evals = [r for r in records if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [0, RM_STEPS // 2, RM_STEPS]
    assert {"loss", "accuracy", "margin", "reward_mean", "reward_std"} <= set(records[1])


def _tokenized(tokenizer, rows, tmp_path):
    path = os.path.join(tmp_path, "pairs.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    ds = data.build_dataset(
        data.DataConfig(path=path, max_length=48, cache_dir=str(tmp_path)), tokenizer, kind="preference"
    )
    return data.collate([ds.data[i] for i in range(len(ds.data))], ds)


def test_stage_checkpoint_stats_and_rescoring(full_run, tmp_path):
    ckpt = train.load_stage(full_run.stage_dir, extras=("reward_head",))
    assert ckpt.stage_info["stage"] == "rm" and ckpt.stage_info["step"] == RM_STEPS and ckpt.lora is None
    head, stats = ckpt.extras["reward_head"], ckpt.extras["reward_stats"]
    assert head["kernel"].shape == (ckpt.spec.hidden_size, 1) and head["bias"].shape == (1,)
    rewards, rows = _eval_pairs(full_run.run_dir)
    both = np.array([r["r_chosen"] for r in rewards] + [r["r_rejected"] for r in rewards])
    assert stats["count"] == both.size and stats["split"] == "eval"
    np.testing.assert_allclose([stats["mean"], stats["std"]], [both.mean(), both.std()], rtol=1e-5, atol=1e-6)
    assert stats == full_run.reward_stats
    # a fresh scoring pass from the stage checkpoint reproduces the stage's own per-pair rewards
    tok = data.load_tokenizer(ckpt.tokenizer_dir)
    batch = _tokenized(tok, rows[:16], tmp_path)
    loaded = reward_model.load(full_run.stage_dir)
    assert loaded.stats == stats and loaded.lora is None
    r_c, r_r = jax.jit(reward_model.score_pairs, static_argnums=0)(
        loaded.spec, loaded.params, loaded.head, batch
    )
    np.testing.assert_allclose(r_c, [r["r_chosen"] for r in rewards[:16]], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(r_r, [r["r_rejected"] for r in rewards[:16]], rtol=1e-4, atol=1e-4)


def test_hf_export_scores_like_the_stage(full_run, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_dir = os.path.join(full_run.run_dir, "export", "hf")
    model = transformers.AutoModelForSequenceClassification.from_pretrained(hf_dir).eval()
    assert type(model).__name__ == "LlamaForSequenceClassification"
    with open(os.path.join(hf_dir, "config.json")) as f:
        assert json.load(f)["jaxrlhf_reward_bias"] == 0.0  # the bias is frozen at 0 without center_coef
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert tok.pad_token_id == model.config.pad_token_id == tok.unk_token_id  # not EOS: EOS is scored
    rewards, rows = _eval_pairs(full_run.run_dir)
    batch = _tokenized(data.load_tokenizer(hf_dir), rows[:16], tmp_path)
    with torch.no_grad():
        out = model(
            input_ids=torch.as_tensor(batch["chosen_input_ids"], dtype=torch.long),
            attention_mask=torch.as_tensor(batch["chosen_attention_mask"]),
        ).logits[:, 0]
    np.testing.assert_allclose(out.numpy(), [r["r_chosen"] for r in rewards[:16]], atol=1e-4)


def test_lora_reward_adapter_over_the_shared_base(sft_stage, tmp_path_factory, tmp_path):
    out = tmp_path_factory.mktemp("rm_lora")
    cfg = _rm_config(
        out, sft_stage, tmp_path_factory, "optim.total_steps=8", "train.eval_every=1000", "lora.rank=4",
        "lora.alpha=8", "export.hf=false",
    )  # fmt: skip
    result = rm.run(cfg)
    assert np.isfinite(result.eval_metrics["loss"])
    ckpt = train.load_stage(result.stage_dir, extras=("reward_head",))
    base = train.load_stage(sft_stage)
    assert ckpt.lora is not None and ckpt.lora_config.rank == 4
    # the base is untouched (shared with the policy); only the adapter and the head were trained
    for a, b in zip(jax.tree.leaves(ckpt.params), jax.tree.leaves(base.params), strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(float(np.abs(x).max()) > 0 for x in jax.tree.leaves(ckpt.lora))
    # loaded sharded over the 8 devices, the adapter scores like its merge into the base
    loaded = reward_model.load(result.stage_dir, mesh=sharding.make_mesh(data=1, fsdp=-1, tensor=1))
    batch = _tokenized(data.load_tokenizer(loaded.tokenizer_dir), _read_jsonl(PREFS)[:8], tmp_path)
    ids, mask = batch["chosen_input_ids"], batch["chosen_attention_mask"]
    score = jax.jit(reward_model.score, static_argnums=0, static_argnames="lora_config")
    with_adapter = score(
        loaded.spec, loaded.params, loaded.head, ids, mask, lora=loaded.lora, lora_config=loaded.lora_config
    )
    merged = lora.merge(jax.device_get(loaded.params), jax.device_get(loaded.lora), loaded.lora_config)
    expected = score(loaded.spec, merged, ckpt.extras["reward_head"], ids, mask)
    np.testing.assert_allclose(with_adapter, expected, rtol=1e-4, atol=1e-5)


BAD_ROWS = {
    1: ({"prompt": "What is 1 + 2?", "chosen": "3", "rejected": "3"}, "rejected", "identical"),
    2: ({"prompt": "What is 1 + 2?", "chosen": "3"}, "rejected", "missing"),
    3: ({"prompt": "What is 1 + 2?", "chosen": "", "rejected": "4"}, "chosen", "empty"),
}


def test_bad_preference_rows_are_reported_by_row(sft_stage, tmp_path, tmp_path_factory):
    good = {"prompt": "What is 2 + 2?", "chosen": "Sure! 2 + 2 = 4. Hope this helps!", "rejected": "5"}
    tok = data.load_tokenizer(os.path.join(sft_stage, "tokenizer"))
    for row_index, (row, field, reason) in BAD_ROWS.items():
        path = tmp_path / f"bad{row_index}.jsonl"
        rows = [good] * 5
        rows[row_index] = row
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        with pytest.raises(data.DataError) as err:
            data.build_dataset(
                data.DataConfig(path=str(path), cache_dir=str(tmp_path)), tok, kind="preference"
            )
        assert (err.value.row, err.value.field) == (row_index, field), str(err.value)
        assert reason in str(err.value) and str(path) in str(err.value)
    # the stage surfaces the same error before training starts
    cfg = _rm_config(tmp_path / "run", sft_stage, tmp_path_factory, f"data.path={tmp_path / 'bad1.jsonl'}")
    with pytest.raises(data.DataError, match="row 1"):
        rm.run(cfg)
