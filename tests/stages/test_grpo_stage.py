"""The GRPO and RLOO stages on the bundled tiny task, after the session's tiny SFT (8 fake devices).

- with a Python reward defined here (``terse_reward``, the opposite of what the raters liked), that reward
  rises by an asserted margin under GRPO and under RLOO; every rollout's first ratio is 1; the metrics the
  config contract names are logged; the stage checkpoint loads (``train.load_stage``, what ``jaxrlhf
  generate --checkpoint`` reads) and the HF export is written;
- GRPO with the bundled reward model (``configs/tiny/grpo.yaml`` as shipped, a LoRA policy whose reference
  is its base without adapters) runs and its raw reward-model score rises;
- a stopped and rerun RLOO run equals an uninterrupted one; groups of one sample are refused before
  anything compiles.
"""

from __future__ import annotations

import os

import chex
import numpy as np
import pytest

from jaxrlhf import train
from jaxrlhf.config import load_config
from jaxrlhf.stages import grpo, rloo
from tests.stages._tiny_stages import ROOT

HERE = os.path.abspath(__file__)
YAML = {"grpo": os.path.join(ROOT, "configs", "tiny", "grpo.yaml"),
        "rloo": os.path.join(ROOT, "configs", "tiny", "rloo.yaml")}  # fmt: skip
MODULES = {"grpo": (grpo, grpo.GRPOConfig), "rloo": (rloo, rloo.RLOOConfig)}

pytestmark = pytest.mark.slow


def terse_reward(prompts, completions, **columns):
    """1 for an answer without the polite wrapper, 0 otherwise (the raters liked the opposite)."""
    return [0.0 if c.strip().startswith("Sure") else 1.0 for c in completions]


def _cfg(kind, out, tmp_path_factory, policy, *extra):
    _, cls = MODULES[kind]
    return load_config(
        cls,
        YAML[kind],
        [
            f"output_dir={out}", f"model.path={policy}", "train.progress=false", "train.tensorboard=false",
            f"data.cache_dir={tmp_path_factory.getbasetemp() / 'tiny_data_cache'}", *extra,
        ],
    )  # fmt: skip


def _records(run_dir):
    return [r for r in train.read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if "policy_loss" in r]


PY_REWARD = ["reward.path=null", f"reward.function={HERE}:terse_reward", "samples.num=0"]


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_python_reward_rises(kind, tiny_sft, tmp_path_factory):
    mod, _ = MODULES[kind]
    res = mod.run(
        _cfg(
            kind,
            tmp_path_factory.mktemp(f"{kind}_fn"),
            tmp_path_factory,
            tiny_sft.stage_dir,
            *PY_REWARD,
            "train.iterations=8",
            "optim.lr=2e-4",
        )  # fmt: skip
    )
    recs = _records(res.run_dir)
    assert [r["step"] for r in recs] == list(range(1, 9))
    key = "reward/terse_reward"
    first, last = np.mean([r[key] for r in recs[:3]]), np.mean([r[key] for r in recs[-3:]])
    assert last >= first + 0.2, (first, last)
    for r in recs:  # the update recomputes exactly the rollout's log-probs
        assert abs(r["ratio_first"] - 1.0) <= 1e-5 and r["approx_kl_first"] <= 1e-6
    for k in ("reward_mean", "reward_std", "group_reward_std", "frac_reward_zero_std", "completion_length",
              "clipfrac", "kl_ref", "entropy", "policy_loss", "loss", "generation_seconds", "scoring_seconds",
              "update_seconds", "stop_fraction"):  # fmt: skip
        assert np.isfinite(recs[-1][k]), k
    assert 0.0 <= recs[0]["frac_reward_zero_std"] <= 1.0
    stage = train.load_stage(res.stage_dir)
    assert stage.stage_info["stage"] == kind and stage.stage_info["iterations"] == 8
    assert os.path.isfile(os.path.join(res.run_dir, "export", "hf", "model.safetensors"))


def test_grpo_with_the_reward_model_and_a_lora_policy(tiny_sft, tiny_rm, tmp_path_factory):
    res = grpo.run(
        _cfg(
            "grpo",
            tmp_path_factory.mktemp("grpo_rm"),
            tmp_path_factory,
            tiny_sft.stage_dir,
            f"reward.path={tiny_rm.stage_dir}",
            "lora.rank=8",
            "lora.alpha=16",
            "lora.targets=[all-linear]",
            "optim.lr=2e-3",
            "train.iterations=10",
            "train.eval_every=5",
            "samples.num=16",
        )  # fmt: skip
    )
    recs = _records(res.run_dir)
    assert np.mean([r["reward_mean"] for r in recs[-3:]]) > np.mean([r["reward_mean"] for r in recs[:3]])
    assert recs[-1]["kl"] > 0 and recs[0]["kl_ref"] == pytest.approx(0.0, abs=1e-5)  # reference = the base
    stage = train.load_stage(res.stage_dir)
    assert stage.lora is not None
    assert os.path.isdir(os.path.join(res.run_dir, "samples", "000005"))
    assert "rule_score" in res.samples and os.path.getsize(os.path.join(res.run_dir, "rollout_samples.jsonl"))


def test_stop_and_rerun_equals_uninterrupted(tiny_sft, tmp_path_factory):
    # test_python_reward_rises[rloo]'s config but the iterations (a rollout's programs do not depend on them:
    # they load from the session's compilation cache)
    sets = [*PY_REWARD, "checkpoint.every=2", "optim.lr=2e-4"]
    a_dir = tmp_path_factory.mktemp("rloo_a")
    full = rloo.run(_cfg("rloo", a_dir, tmp_path_factory, tiny_sft.stage_dir, *sets, "train.iterations=4"))
    out = tmp_path_factory.mktemp("rloo_b")
    rloo.run(_cfg("rloo", out, tmp_path_factory, tiny_sft.stage_dir, *sets, "train.iterations=2"))
    resumed = rloo.run(_cfg("rloo", out, tmp_path_factory, tiny_sft.stage_dir, *sets, "train.iterations=4"))
    a, b = train.load_stage(full.stage_dir), train.load_stage(resumed.stage_dir)
    chex.assert_trees_all_close(b.params, a.params, atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(
        [r["policy_loss"] for r in _records(resumed.run_dir)],
        [r["policy_loss"] for r in _records(full.run_dir)],
        rtol=1e-5,
        atol=1e-6,
    )


def test_bad_configs_fail_before_compiling(tiny_sft, tmp_path_factory, tmp_path):
    cases = [
        ("grpo", ["rollout.sampling.n=1"], "groups of >= 2"),
        ("rloo", ["grpo.num_minibatches=3"], "grpo"),  # a section RLOO does not have
        ("grpo", ["grpo.num_minibatches=3"], "must divide by grpo.num_minibatches"),
        ("grpo", ["grpo.loss_type=ppo"], "loss_type"),
    ]
    for i, (kind, sets, msg) in enumerate(cases):
        mod, _ = MODULES[kind]
        with pytest.raises((ValueError, KeyError), match=msg):
            mod.run(_cfg(kind, tmp_path / f"run{i}", tmp_path_factory, tiny_sft.stage_dir, *PY_REWARD, *sets))
