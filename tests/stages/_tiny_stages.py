"""Configs of the session-wide tiny stages (fixtures in tests/stages/conftest.py)."""

from __future__ import annotations

import os

from jaxrlhf.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SFT_YAML = os.path.join(ROOT, "configs", "tiny", "sft.yaml")
RM_YAML = os.path.join(ROOT, "configs", "tiny", "rm.yaml")
SFT_STEPS, RM_STEPS = 100, 300


def shared_caches(tmp_path_factory) -> list[str]:
    """One tiny tokenizer and tokenized-data cache for the whole session."""
    base = tmp_path_factory.getbasetemp()
    return [f"tokenizer.cache_dir={base / 'tiny_tokenizer'}", f"data.cache_dir={base / 'tiny_data_cache'}"]


def rm_config(out, sft_stage, tmp_path_factory, *extra: str):
    from jaxrlhf.stages import rm

    overrides = [
        f"output_dir={out}", f"model.path={sft_stage}", f"optim.total_steps={RM_STEPS}",
        f"train.eval_every={RM_STEPS // 2}", "train.progress=false", "train.tensorboard=false",
        f"data.cache_dir={tmp_path_factory.getbasetemp() / 'tiny_data_cache'}", *extra,
    ]  # fmt: skip
    return load_config(rm.RMConfig, RM_YAML, overrides)
