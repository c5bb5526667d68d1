"""The PPO stage on the bundled tiny task, after the session's tiny SFT and reward model (8 fake devices).

- with the bundled reward model, the ground-truth rule score of temperature-1 samples rises over the SFT
  policy's (same prompts, same draws) while the KL to the reference stays bounded, and the first PPO ratio
  of every rollout is 1;
- with a Python reward defined here (``terse_reward``, the opposite of what the raters liked), that reward
  rises: PPO optimises whatever reward it is given;
- policy, critic and reward as three LoRA adapter sets on one frozen base hold one copy of the base;
- a tiny T5 policy's reward rises (encoder-decoder rollout, decoder value head);
- a run stopped and rerun equals an uninterrupted one; bad reward configs fail before anything compiles.
"""

from __future__ import annotations

import os

import chex
import numpy as np
import pytest

from jaxrlhf import train
from jaxrlhf.config import load_config
from jaxrlhf.stages import ppo, sft
from tests.stages._compile_cache import module_compile_cache  # noqa: F401  (autouse: reruns load)
from tests.stages._tiny_stages import ROOT, SFT_YAML, rm_config, shared_caches

PPO_YAML = os.path.join(ROOT, "configs", "tiny", "ppo.yaml")
HERE = os.path.abspath(__file__)

pytestmark = pytest.mark.slow


def terse_reward(prompts, completions, **columns):
    """1 for an answer without the polite wrapper, 0 otherwise (the raters liked the opposite)."""
    return [0.0 if c.strip().startswith("Sure") else 1.0 for c in completions]


def _cfg(out, tmp_path_factory, policy, *extra):
    return load_config(
        ppo.PPOConfig,
        PPO_YAML,
        [
            f"output_dir={out}", f"model.path={policy}", "train.progress=false", "train.tensorboard=false",
            f"data.cache_dir={tmp_path_factory.getbasetemp() / 'tiny_data_cache'}", *extra,
        ],
    )  # fmt: skip


def _records(run_dir):
    return [r for r in train.read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if "policy_loss" in r]


@pytest.fixture(scope="module")
def rm_run(tiny_sft, tiny_rm, tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo_rm")
    cfg = _cfg(
        out, tmp_path_factory, tiny_sft.stage_dir, f"reward.path={tiny_rm.stage_dir}", "train.iterations=20"
    )
    return ppo.run(cfg)


def test_rule_score_rises_with_the_reward_model_and_kl_stays_bounded(rm_run):
    before, after = rm_run.first_eval["rule_score"], rm_run.samples["rule_score"]
    assert after >= before + 0.1, (before, after)
    recs = _records(rm_run.run_dir)
    assert [r["step"] for r in recs] == list(range(1, 21))
    assert max(r["kl_ref"] for r in recs) < 8.0
    assert recs[-1]["score_raw_mean"] > recs[0]["score_raw_mean"] + 0.5
    for r in recs:  # the first ratio of every rollout: the update recomputes exactly the rollout's log-probs
        assert abs(r["ratio_first"] - 1.0) <= 1e-5 and r["approx_kl_first"] <= 1e-5
    for key in (
        "entropy",
        "clipfrac",
        "explained_variance",
        "kl_coef",
        "stop_fraction",
        "generation_seconds",
        "scoring_seconds",
        "update_seconds",
    ):
        assert np.isfinite(recs[-1][key]), key
    stage = train.load_stage(rm_run.stage_dir, extras=("value_head",))
    assert stage.stage_info["stage"] == "ppo" and stage.stage_info["iterations"] == 20
    assert os.path.isfile(os.path.join(rm_run.run_dir, "export", "hf", "model.safetensors"))
    assert os.path.getsize(os.path.join(rm_run.run_dir, "rollout_samples.jsonl")) > 0


def test_python_reward_rises(tiny_sft, tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo_fn")
    res = ppo.run(
        _cfg(
            out, tmp_path_factory, tiny_sft.stage_dir, "reward.path=null",
            f"reward.function={HERE}:terse_reward", "train.iterations=10", "samples.num=0",
        )
    )  # fmt: skip
    recs = _records(res.run_dir)
    key = "reward/terse_reward"
    first, last = np.mean([r[key] for r in recs[:3]]), np.mean([r[key] for r in recs[-3:]])
    assert last >= first + 0.2, (first, last)


def test_three_adapter_sets_on_one_base(tiny_sft, tmp_path_factory):
    from jaxrlhf.rl.rollout import parameter_bytes
    from jaxrlhf.stages import rm

    rm_lora = rm.run(
        rm_config(
            tmp_path_factory.mktemp("ppo_rm_lora"), tiny_sft.stage_dir, tmp_path_factory,
            "optim.total_steps=20", "train.eval_every=1000", "lora.rank=8", "lora.alpha=16",
            "lora.targets=[all-linear]", "optim.lr=3e-3",
        )
    )  # fmt: skip
    out = tmp_path_factory.mktemp("ppo_lora")
    res = ppo.run(
        _cfg(
            out, tmp_path_factory, tiny_sft.stage_dir, f"reward.path={rm_lora.stage_dir}", "lora.rank=8",
            "lora.alpha=16", "lora.targets=[all-linear]", "critic.init=policy", "critic.lora.rank=8",
            "critic.lora.targets=[all-linear]", "optim.lr=2e-3", "critic_optim.lr=2e-3",
            "train.iterations=6", "samples.num=0",
        )
    )  # fmt: skip
    base = train.load_stage(tiny_sft.stage_dir).params
    stage = train.load_stage(res.stage_dir)
    assert stage.base is not None and stage.lora is not None and set(stage.adapter_sets) == {"critic"}
    # policy base = reference = critic base = reward base: the frozen weights are held once
    assert stage.stage_info["frozen_bytes"] < 1.2 * parameter_bytes(base), stage.stage_info["frozen_bytes"]
    recs = _records(res.run_dir)
    assert recs[-1]["score_raw_mean"] > recs[0]["score_raw_mean"]


def test_t5_policy_reward_rises(tmp_path_factory):
    t5 = sft.run(
        load_config(
            sft.SFTConfig,
            SFT_YAML,
            [
                f"output_dir={tmp_path_factory.mktemp('ppo_t5_sft')}", "model.spec=null",
                "data.packing=false", "data.max_length=32",
                "model.hf_config={model_type: t5, d_model: 32, d_kv: 8, d_ff: 64, num_layers: 1, "
                "num_heads: 4, feed_forward_proj: gated-gelu, tie_word_embeddings: false}",
                "optim.total_steps=60", "optim.lr=3e-3", "train.eval_every=0", "train.progress=false",
                "samples.num=0", "export.hf=false", *shared_caches(tmp_path_factory),
            ],
        )
    )  # fmt: skip
    res = ppo.run(
        _cfg(
            tmp_path_factory.mktemp("ppo_t5"), tmp_path_factory, t5.stage_dir, "reward.path=null",
            f"reward.function={HERE}:terse_reward", "train.iterations=8", "samples.num=0",
            "optim.lr=3e-4",
        )
    )  # fmt: skip
    recs = _records(res.run_dir)
    first, last = (
        np.mean([r["reward/terse_reward"] for r in recs[:3]]),
        np.mean([r["reward/terse_reward"] for r in recs[-3:]]),
    )
    assert last > first + 0.1, (first, last)
    assert abs(recs[0]["ratio_first"] - 1.0) <= 1e-5


def test_stop_and_rerun_equals_uninterrupted(tiny_sft, tmp_path_factory):
    # the config of test_python_reward_rises but the iterations (its compiled programs are in the module's
    # compilation cache): 2 uninterrupted, or 1 then resumed to 2
    sets = ["reward.path=null", f"reward.function={HERE}:terse_reward", "samples.num=0", "checkpoint.every=1"]
    full = ppo.run(_cfg(tmp_path_factory.mktemp("ppo_a"), tmp_path_factory, tiny_sft.stage_dir, *sets,
                        "train.iterations=2"))  # fmt: skip
    out = tmp_path_factory.mktemp("ppo_b")
    ppo.run(_cfg(out, tmp_path_factory, tiny_sft.stage_dir, *sets, "train.iterations=1"))
    resumed = ppo.run(_cfg(out, tmp_path_factory, tiny_sft.stage_dir, *sets, "train.iterations=2"))
    a, b = train.load_stage(full.stage_dir), train.load_stage(resumed.stage_dir)
    chex.assert_trees_all_close(b.params, a.params, atol=1e-6, rtol=1e-6)
    assert (
        [r["step"] for r in _records(resumed.run_dir)]
        == [r["step"] for r in _records(full.run_dir)]
        == [1, 2]
    )
    np.testing.assert_allclose(
        [r["policy_loss"] for r in _records(resumed.run_dir)],
        [r["policy_loss"] for r in _records(full.run_dir)],
        rtol=1e-5,
        atol=1e-6,
    )


def test_bad_reward_configs_fail_before_compiling(tiny_sft, tmp_path_factory, tmp_path):
    bad = tmp_path / "bad_reward.py"
    bad.write_text("def short(prompts, completions, **kw):\n    return [1.0]\n\ndef text(p, c, **kw):\n"
                   "    return ['x'] * len(c)\n")  # fmt: skip
    cases = [
        (["reward.path=null", "reward.function=null"], "set reward.path"),
        (["reward.path=null", "reward.function=no_such_module_xyz:f"], "no_such_module_xyz"),
        (["reward.path=null", f"reward.function={bad}:short"], "returned 1 values for 2 completions"),
        (["reward.path=null", f"reward.function={bad}:text"], "not a number"),
    ]
    for sets, msg in cases:
        with pytest.raises((ValueError, FileNotFoundError, ImportError), match=msg):
            ppo.run(_cfg(tmp_path / f"run{len(msg)}", tmp_path_factory, tiny_sft.stage_dir, *sets))
