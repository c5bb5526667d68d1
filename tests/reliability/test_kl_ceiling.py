"""The RL KL ceiling (``train.max_kl``): a rollout whose KL to the reference is above it either stops the run
before that update, keeping the checkpoints from before the policy crossed it (``kl_action=stop``), or
lowers the policy's learning rate by ``kl_lr_factor`` and goes on (``kl_action=lower_lr``); a stopped run
resumes with ``kl_action=lower_lr`` (a key that may change on resume) and finishes.

A tiny PPO (a 1-layer policy from scratch, the tiny task's rule as the reward, 8 prompts x 8 tokens): the
first rollout's KL is exactly 0 (policy = reference); later ones (k1 estimates over 64 tokens, which may dip
below 0 right after the first update) mostly lie above a ceiling of 1e-9 nats.
"""

from __future__ import annotations

import json
import os

import pytest

from jaxrlhf import train
from jaxrlhf.config import load_config
from jaxrlhf.stages import _rl_loop, ppo

PPO_YAML = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "configs/tiny/ppo.yaml")
SPEC = (
    "{model_type: llama, hidden_size: 32, num_layers: 1, num_heads: 2, num_kv_heads: 1, head_dim: 16, "
    "intermediate_size: 64, max_position_embeddings: 128, tie_word_embeddings: true}"
)
CEILING = 1e-9

pytestmark = pytest.mark.slow


def _cfg(out, caches, *extra):
    return load_config(
        ppo.PPOConfig,
        PPO_YAML,
        [
            f"output_dir={out}", "model.path=null", f"model.spec={SPEC}", "tokenizer.path=tiny",
            f"tokenizer.cache_dir={caches / 'tok'}", f"data.cache_dir={caches / 'data'}", "reward.path=null",
            "reward.function=tiny", "data.batch_size=8", "rollout.sampling.max_new_tokens=8", "ppo.epochs=1",
            "samples.num=0", "checkpoint.every=1", "optim.lr=1e-3", "train.progress=false",
            "train.tensorboard=false", "export.hf=false", *extra,
        ],
    )  # fmt: skip


def _records(run_dir):
    return [r for r in train.read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if "loss" in r]


def test_lower_lr_halves_the_learning_rate_at_each_rollout_above_the_ceiling(tmp_path, caplog):
    out = tmp_path / "run"
    cfg = _cfg(out, tmp_path, "train.iterations=3", f"train.max_kl={CEILING}", "train.kl_action=lower_lr")
    with caplog.at_level("WARNING", logger="jaxrlhf.rl_loop"):
        result = ppo.run(cfg)
    assert result.stage_dir  # the run went on to the end
    recs = _records(out)
    assert recs[0]["kl_ref"] == 0.0  # policy = reference
    # halved before each update whose rollout is above the ceiling (the k1 estimate may dip below it)
    scale, want = 1.0, []
    for i, r in enumerate(recs, start=1):
        if r["kl_ref"] > CEILING:
            scale *= 0.5
            assert f"iteration {i}: KL to the reference" in caplog.text
            assert f"(now {scale:g} x optim.lr)" in caplog.text
        want.append(scale)
    assert [r["lr_scale"] for r in recs] == want and want[-1] < 1.0  # lowered at least once
    # the factor is optimizer state: a checkpoint holds it
    mgr = train.CheckpointManager(out / "checkpoints")
    assert mgr.all_steps() == [2, 3]
    mgr.close()


def test_stop_keeps_the_checkpoints_from_before_the_ceiling(tmp_path, caplog):
    out = tmp_path / "run"
    ppo.run(_cfg(out, tmp_path, "train.iterations=2"))  # no ceiling yet: checkpoints 1 and 2
    with pytest.raises(_rl_loop.KLCeilingError) as e:  # resumed with one (a key that may change)
        ppo.run(_cfg(out, tmp_path, "train.iterations=4", f"train.max_kl={CEILING}"))
    err = e.value
    assert err.iteration == 3 and err.kl > CEILING and err.checkpoint == 1
    msg = str(err)
    assert "rose above train.max_kl at iteration 3" in msg and "before iteration 3's update" in msg
    assert f"moved to {out / 'checkpoints-over-max-kl' / '2'}" in msg
    assert f"step 1 in {out / 'checkpoints'}" in msg and "train.kl_action=lower_lr" in msg
    # the policy over the ceiling (after iteration 2) is set aside, not deleted; a rerun resumes from step 1
    assert os.path.isdir(out / "checkpoints-over-max-kl" / "2")
    with open(out / "stage" / "stage.json") as f:  # the first run's, not overwritten by the stopped one
        assert json.load(f)["step"] == 2
    assert [r["step"] for r in _records(out)] == [1, 2]  # the stopped iteration logged nothing
    mgr = train.CheckpointManager(out / "checkpoints")
    assert mgr.all_steps() == [1] and mgr.latest_step() == 1
    mgr.close()
    # the way out the message names: the same command with train.kl_action=lower_lr (a key that may change
    # on resume) resumes from step 1 and finishes, lowering the learning rate instead of stopping
    with caplog.at_level("INFO", logger="jaxrlhf.runner"):
        result = ppo.run(
            _cfg(out, tmp_path, "train.iterations=4", f"train.max_kl={CEILING}", "train.kl_action=lower_lr")
        )
    assert result.stage_dir and f"resumed from {out / 'checkpoints'} at step 1" in caplog.text
    recs = _records(out)
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    scale = 1.0  # halved before each update whose rollout is above the ceiling (k1 may dip below it)
    for r in recs[1:]:
        scale *= 0.5 if r["kl_ref"] > CEILING else 1.0
        assert r["lr_scale"] == scale, (r["step"], r["kl_ref"], r["lr_scale"], scale)
    assert recs[-1]["lr_scale"] < 1.0  # a resumed rollout was above it: the factor really moved
    with open(out / "stage" / "stage.json") as f:
        assert json.load(f)["step"] == 4


def test_bad_ceiling_settings_are_refused(tmp_path):
    from jaxrlhf.config import ConfigError

    for bad, what in (("train.max_kl=0", "max_kl"), ("train.kl_lr_factor=1.5", "kl_lr_factor"),
                      ("train.kl_action=pause", "kl_action")):  # fmt: skip
        with pytest.raises((ConfigError, ValueError), match=what):
            _cfg(tmp_path, tmp_path, bad)
