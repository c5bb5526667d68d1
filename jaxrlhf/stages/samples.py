"""Sample generations at the end of a stage (``samples.jsonl``), scored by a ground-truth rule when given.

``samples.rule``: ``tiny`` (the bundled task's :func:`jaxrlhf.assets.tiny.check`, which also reports the
fractions of ``correct`` and ``polite`` answers) or ``package.module:function`` with the signature
``f(prompt: str, response: str) -> float``. The rule only scores samples; no model is trained on it.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jaxrlhf import data, generation
from jaxrlhf.generation import SamplingConfig
from jaxrlhf.stages.common import logger, resolve_path


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """``num`` prompts (0 = none) from ``prompts`` (a file of prompt / prompt_completion / messages rows;
    null = the training data), generated ``batch_size`` at a time with ``sampling``."""

    num: int = 16
    prompts: str | None = None
    batch_size: int = 64
    sampling: SamplingConfig = SamplingConfig(max_new_tokens=32, temperature=0.0)
    rule: str | None = None


def resolve_rule(name: str | None) -> dict[str, Callable[[str, str], float]]:
    """Scorers by metric name: ``{"rule_score": f}`` (+ ``correct`` / ``polite`` for ``tiny``)."""
    if name is None:
        return {}
    if name == "tiny":
        from jaxrlhf.assets import tiny

        return {
            "rule_score": tiny.check,
            "correct": lambda p, r: float(tiny.is_correct(p, r)),
            "polite": lambda p, r: float(tiny.is_polite(r)),
        }
    if ":" not in name:
        raise ValueError(f"samples.rule must be 'tiny' or 'package.module:function', got {name!r}")
    module, fn = name.split(":", 1)
    return {"rule_score": getattr(importlib.import_module(module), fn)}


def _prompt_text(row: dict) -> str:
    prompt = row.get("prompt")
    if isinstance(prompt, str):
        return prompt
    messages = prompt if isinstance(prompt, list) else row.get("messages") or row.get("conversations") or []
    users = [
        m.get("content", m.get("value", ""))
        for m in messages
        if m.get("role", m.get("from")) in ("user", "human")
    ]
    return users[-1] if users else ""


def write_samples(
    cfg: SampleConfig,
    out_dir: str,
    spec,
    params,
    adapters,
    lora_config,
    tokenizer,
    data_cfg,
    mesh,
    rng: jax.Array,
    *,
    compute_dtype: Any = None,
) -> dict[str, float]:
    """Generate for ``cfg.num`` prompts, write ``<out_dir>/samples.jsonl``; return mean scores."""
    if cfg.num <= 0:
        return {}
    path = resolve_path(cfg.prompts) if cfg.prompts else data_cfg.path
    pcfg = dataclasses.replace(
        data_cfg, path=path, format=None, packing=False, eval_split=None, eval_fraction=0.0, streaming=False
    )
    ds = data.build_dataset(pcfg, tokenizer, kind="prompt")
    n = min(cfg.num, len(ds.data))
    bs = min(cfg.batch_size, n)
    loader = data.Loader(ds, bs, shuffle=False, num_epochs=1, process_index=0, process_count=1)
    scorers = resolve_rule(cfg.rule)
    rows: list[dict] = []
    for i, batch in enumerate(loader):
        if len(rows) >= n:
            break
        prompt_ids, prompt_mask = batch["prompt_ids"], batch["prompt_mask"]
        if spec.is_encoder_decoder:  # encoder inputs are tokenized like seq2seq training inputs: text + EOS
            texts = [_prompt_text(ds.raw[int(j)]) for j in batch["index"]]
            enc = [tokenizer.encode(t) + [tokenizer.eos_token_id] for t in texts]
            width = max(map(len, enc))
            prompt_ids = np.asarray([[tokenizer.pad_token_id] * (width - len(e)) + e for e in enc], np.int32)
            prompt_mask = np.asarray([[0] * (width - len(e)) + [1] * len(e) for e in enc], np.int32)
        if jax.process_count() > 1:  # every process holds the whole batch: make it one global array
            from jaxrlhf.stages.runner import global_from_full

            g = global_from_full({"ids": prompt_ids, "mask": prompt_mask}, mesh)
            prompt_ids, prompt_mask = g["ids"], g["mask"]
        res = generation.generate(
            spec,
            params,
            prompt_ids,
            prompt_mask,
            jax.random.fold_in(rng, i),
            cfg.sampling,
            lora=adapters,
            lora_config=lora_config,
            compute_dtype=compute_dtype,
            mesh=mesh,
        )
        from jaxrlhf.stages.runner import host_array

        tokens, mask = host_array((res.tokens, res.mask))
        per_prompt = tokens.shape[0] // len(batch["index"])
        for r in range(tokens.shape[0]):
            src = ds.raw[int(batch["index"][r // per_prompt])]
            prompt = _prompt_text(src)
            completion = tokenizer.decode(tokens[r][mask[r] > 0], skip_special_tokens=True).strip()
            row = {"prompt": prompt, "completion": completion}
            row.update({k: float(f(prompt, completion)) for k, f in scorers.items()})
            rows.append(row)
    if jax.process_index() == 0:
        with open(os.path.join(out_dir, "samples.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    summary = {"num": float(len(rows))}
    summary.update({k: float(np.mean([r[k] for r in rows])) for k in scorers})
    for r in rows[:3]:
        logger.info("sample: %r -> %r", r["prompt"], r["completion"])
    logger.info("samples: %s (%s)", summary, os.path.join(out_dir, "samples.jsonl"))
    return summary
