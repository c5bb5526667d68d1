"""Session-wide tiny stages that several stage tests build on (trained once per test session): a short
tiny SFT stage (100 steps from scratch; greedy answers partly right, sampled answers a mixture of styles)
and the reward model trained on it (the tiny RM config, 300 steps; held-out accuracy >= 0.9)."""

from __future__ import annotations

import os
import pickle

import pytest

from jaxrlhf.config import load_config
from tests.stages._tiny_stages import SFT_STEPS, SFT_YAML, rm_config, shared_caches


def _once(tmp_path_factory, name: str, build):
    """``build(out_dir)`` once per test run: under pytest-xdist the first worker to get here builds it in a
    directory all workers share (behind a file lock) and the others load its pickled result."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        return build(tmp_path_factory.mktemp(name))
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp().parent / "shared"
    root.mkdir(exist_ok=True)
    done = root / f"{name}.pickle"
    with FileLock(str(root / f"{name}.lock")):
        if done.exists():
            return pickle.loads(done.read_bytes())
        result = build(root / name)
        done.write_bytes(pickle.dumps(result))
        return result


@pytest.fixture(scope="session")
def tiny_sft(tmp_path_factory):
    from jaxrlhf.stages import sft

    def build(out):
        overrides = [
            f"output_dir={out}", f"optim.total_steps={SFT_STEPS}", "optim.warmup_steps=10",
            "train.eval_every=1000", "train.progress=false", "train.tensorboard=false", "samples.num=0",
            "export.hf=false", *shared_caches(tmp_path_factory),
        ]  # fmt: skip
        return sft.run(load_config(sft.SFTConfig, SFT_YAML, overrides))

    return _once(tmp_path_factory, "tiny_sft", build)


@pytest.fixture(scope="session")
def tiny_rm(tiny_sft, tmp_path_factory):
    from jaxrlhf.stages import rm

    return _once(
        tmp_path_factory, "tiny_rm", lambda out: rm.run(rm_config(out, tiny_sft.stage_dir, tmp_path_factory))
    )
