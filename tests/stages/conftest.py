"""Session-wide tiny stages that several stage tests build on (trained once per test session): a short
tiny SFT stage (100 steps from scratch; greedy answers partly right, sampled answers a mixture of styles)
and the reward model trained on it (the tiny RM config, 300 steps; held-out accuracy >= 0.9)."""

from __future__ import annotations

import pytest

from jaxrlhf.config import load_config
from tests.stages._tiny_stages import SFT_STEPS, SFT_YAML, rm_config, shared_caches


@pytest.fixture(scope="session")
def tiny_sft(tmp_path_factory):
    from jaxrlhf.stages import sft

    out = tmp_path_factory.mktemp("tiny_sft")
    overrides = [
        f"output_dir={out}", f"optim.total_steps={SFT_STEPS}", "optim.warmup_steps=10",
        "train.eval_every=1000", "train.progress=false", "train.tensorboard=false", "samples.num=0",
        "export.hf=false", *shared_caches(tmp_path_factory),
    ]  # fmt: skip
    return sft.run(load_config(sft.SFTConfig, SFT_YAML, overrides))


@pytest.fixture(scope="session")
def tiny_rm(tiny_sft, tmp_path_factory):
    from jaxrlhf.stages import rm

    return rm.run(rm_config(tmp_path_factory.mktemp("tiny_rm"), tiny_sft.stage_dir, tmp_path_factory))
