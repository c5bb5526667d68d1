"""``jaxrlhf score`` with the session's tiny reward model: scores equal ``reward_model.score`` of the RM's own
tokenisation, pairs reproduce the RM stage's eval, bad rows are named, and ``jaxrlhf generate`` points an RM
checkpoint to ``jaxrlhf score``."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf import cli, data, reward_model
from jaxrlhf.assets import tiny

PREFS = tiny.asset_path("prefs.jsonl")


def _rows(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _direct(stage: str, texts: list[tuple[str, str]]) -> np.ndarray:
    """The RM's score of each (prompt, completion) alone: [BOS] prompt completion EOS, unpadded."""
    rm = reward_model.load(stage)
    tok = data.load_tokenizer(os.path.join(stage, "tokenizer"))

    @jax.jit
    def one(params, head, ids):
        return reward_model.score(rm.spec, params, head, ids, jnp.ones_like(ids), lora=rm.lora,
                                  lora_config=rm.lora_config)[0]  # fmt: skip

    out = []
    for prompt, completion in texts:
        ids = [*tok.prefix_ids, *tok.encode(prompt), *tok.encode(completion), tok.eos_token_id]
        out.append(float(one(rm.params, rm.head, jnp.asarray([ids], jnp.int32))))
    return np.asarray(out)


def test_completion_scores_equal_the_reward_model(tiny_rm, tmp_path, capsys):
    prefs = _rows(PREFS)[:5]  # 10 rows in batches of 8 (the fake devices): the second one partly filled
    rows = [{"prompt": r["prompt"], "completion": r[side], "id": i} for i, r in enumerate(prefs)
            for side in ("chosen", "rejected")]  # fmt: skip
    path, out = _write(tmp_path / "c.jsonl", rows), tmp_path / "scores.jsonl"
    argv = ["score", "--checkpoint", tiny_rm.stage_dir, "--pairs", path, "--batch-size", "8"]
    assert cli.main([*argv, "--output", str(out)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    got = _rows(str(out))
    assert [g["index"] for g in got] == list(range(10)) and [g["id"] for g in got] == [r["id"] for r in rows]
    want = _direct(tiny_rm.stage_dir, [(r["prompt"], r["completion"]) for r in rows])
    np.testing.assert_allclose([g["reward"] for g in got], want, atol=1e-5, rtol=0)
    assert line.startswith(f"scored 10 completions with {tiny_rm.stage_dir}: reward mean {want.mean():.4f}")
    # --normalize: (r - mean) / std with reward_stats.json, as PPO feeds the policy
    assert cli.main([*argv, "--output", str(out), "--normalize"]) == 0
    stats = tiny_rm.reward_stats
    normed = [g["reward"] for g in _rows(str(out))]
    np.testing.assert_allclose(normed, (want - stats["mean"]) / stats["std"], atol=1e-4, rtol=0)
    assert "normalized" in capsys.readouterr().out


def test_pairs_reproduce_the_rm_stage_eval(tiny_rm, tmp_path, capsys):
    """The RM stage's held-out pairs (eval_rewards.jsonl names their rows): same rewards, same accuracy."""
    evals = _rows(os.path.join(tiny_rm.run_dir, "eval_rewards.jsonl"))
    prefs = _rows(PREFS)
    path = _write(tmp_path / "pairs.jsonl", [prefs[e["index"]] for e in evals])
    out = tmp_path / "pairs_scored.jsonl"
    argv = ["score", "--checkpoint", tiny_rm.stage_dir, "--pairs", path, "--output", str(out)]
    assert cli.main(argv) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    got = _rows(str(out))
    assert len(got) == len(evals) == tiny_rm.reward_stats["count"] // 2
    np.testing.assert_allclose([g["r_chosen"] for g in got], [e["r_chosen"] for e in evals], atol=1e-5)
    np.testing.assert_allclose([g["r_rejected"] for g in got], [e["r_rejected"] for e in evals], atol=1e-5)
    accuracy = np.mean([g["r_chosen"] > g["r_rejected"] for g in got])
    assert accuracy == pytest.approx(tiny_rm.reward_stats["accuracy"], abs=1e-6)
    assert f"accuracy {tiny_rm.reward_stats['accuracy']:.4f}" in line and line.startswith(
        f"scored {len(got)} pairs"
    )
    assert got[0]["prompt"] == prefs[evals[0]["index"]]["prompt"]  # the source row rides along


def test_bad_rows_and_wrong_checkpoints_exit_2(tiny_rm, tiny_sft, tmp_path, capsys):
    rows = [{"prompt": "What is 2 + 3?", "completion": " 5"}, {"prompt": "What is 1 + 1?"}]
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")  # row 1 is on line 3
    assert cli.main(["score", "--checkpoint", tiny_rm.stage_dir, "--pairs", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}, row 1, field 'completion' (line 3 of the file): missing value" in err
    assert (
        cli.main(["score", "--checkpoint", tiny_rm.stage_dir, "--pairs", str(path), "--on-bad-row", "skip"])
        == 0
    )
    assert "scored 1 completions" in (out := capsys.readouterr().out) and "(1 bad rows skipped)" in out
    assert cli.main(["score", "--checkpoint", tiny_sft.stage_dir, "--pairs", str(path)]) == 2
    assert "a 'sft' stage checkpoint, not a reward model" in capsys.readouterr().err


def test_generate_refuses_a_reward_model_with_a_pointer_to_score(tiny_rm, capsys):
    assert cli.main(["generate", "--checkpoint", tiny_rm.stage_dir, "--prompt", "What is 2 + 3?"]) == 2
    err = capsys.readouterr().err
    assert "is a reward-model checkpoint" in err and f"jaxrlhf score --checkpoint {tiny_rm.stage_dir}" in err
