"""Preference pairs cut to max_length keep ONE prompt: both responses are judged after the same context (TRL
truncates the shared prompt, not each side's), and the shared-prompt pair rows stay one prompt long."""

import json

import pytest

from jaxrlhf import data


@pytest.fixture(scope="module")
def bpe(tok_dirs):
    return data.load_tokenizer(tok_dirs["bpe"], chat_template="chatml")


def build(tmp_path, rows, tok, name="p.jsonl", **kw):
    path = tmp_path / name
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = data.DataConfig(path=str(path), cache_dir=str(tmp_path / f"cache-{name}"), **kw)
    return data.build_dataset(cfg, tok, "preference")


def _prompt_part(ex, side):
    ids, mask = ex[f"{side}_input_ids"], ex[f"{side}_loss_mask"]
    return ids[: mask.index(1)]


@pytest.mark.parametrize("chat", [False, True])
def test_both_sides_lose_the_same_prompt_tokens(tmp_path, bpe, chat):
    prompt = " ".join(f"w{i}" for i in range(60))
    long, short = "a long answer " * 6, "no"
    if chat:
        row = {
            "prompt": [{"role": "user", "content": prompt}],
            "chosen": [{"role": "assistant", "content": long}],
            "rejected": [{"role": "assistant", "content": short}],
        }
    else:
        row = {"prompt": prompt, "chosen": long, "rejected": short}
    full = build(tmp_path, [row], bpe, name=f"full{chat}.jsonl", max_length=4096).data[0]
    ex = build(tmp_path, [row], bpe, name=f"cut{chat}.jsonl", max_length=64).data[0]
    assert len(ex["chosen_input_ids"]) == 64 < len(full["chosen_input_ids"])  # the longer side fills it
    assert len(ex["rejected_input_ids"]) < 64
    # one prompt for both, cut from the left after the prefix, the responses whole
    assert _prompt_part(ex, "chosen") == _prompt_part(ex, "rejected")
    prefix = len(bpe.prefix_ids)
    kept = _prompt_part(ex, "chosen")[prefix:]
    assert kept == _prompt_part(full, "chosen")[-len(kept) :]
    for side in ("chosen", "rejected"):
        n = sum(ex[f"{side}_loss_mask"])
        assert ex[f"{side}_input_ids"][-n:] == full[f"{side}_input_ids"][-n:]
    # the two rows differ only after the shared prompt: a pair row holds the prompt once
    diverge = next(
        i
        for i, (a, b) in enumerate(zip(ex["chosen_input_ids"], ex["rejected_input_ids"], strict=False))
        if a != b
    )
    assert diverge >= len(_prompt_part(ex, "chosen"))


def test_a_pair_whose_longer_response_does_not_fit_names_that_response(tmp_path, bpe):
    rows = [{"prompt": "short prompt", "chosen": "ok", "rejected": "far too long " * 40}]
    with pytest.raises(data.DataError) as e:
        build(tmp_path, rows, bpe, max_length=48)
    assert e.value.row == 0 and e.value.field == "rejected" and "completion alone" in str(e.value)
    # a cut of 5 prompt tokens, set by the longer (rejected) row; the shorter row loses the same 5
    rows = [{"prompt": "short prompt " * 10, "chosen": "fine", "rejected": "long enough answer " * 3}]
    full = build(tmp_path, rows, bpe, name="full.jsonl", max_length=4096).data[0]
    n = len(full["rejected_input_ids"])
    ex = build(tmp_path, rows, bpe, name="ok.jsonl", max_length=n - 5).data[0]
    assert len(ex["rejected_input_ids"]) == n - 5
    assert len(ex["chosen_input_ids"]) == len(full["chosen_input_ids"]) - 5
    assert _prompt_part(ex, "chosen") == _prompt_part(ex, "rejected")


def test_drop_and_error_policies_still_name_the_longer_side(tmp_path, bpe):
    rows = [
        {"prompt": "p", "chosen": "c", "rejected": "r"},
        {"prompt": "p " * 40, "chosen": "c", "rejected": "rr " * 5},
    ]
    ds = build(tmp_path, rows, bpe, name="d.jsonl", max_length=32, truncation="drop")
    assert len(ds) == 1 and ds.skipped == 1
    with pytest.raises(data.DataError) as e:
        build(tmp_path, rows, bpe, name="e.jsonl", max_length=32, truncation="error")
    assert e.value.row == 1 and e.value.field == "rejected" and "max_length" in str(e.value)
