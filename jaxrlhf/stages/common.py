"""Config sections and helpers shared by the stages (model source, tokenizer, mesh, run directory).

Each stage config nests these frozen dataclasses next to other modules' own (``data.DataConfig``,
``train.OptimConfig``, ``lora.LoraConfig``, ``generation.SamplingConfig``). YAML section names match the
field names: ``model``, ``tokenizer``, ``train``, ``checkpoint``, ``export``, ``samples``.

Paths of bundled files can be written ``tiny:NAME`` (e.g. ``tiny:sft.jsonl``), resolved by
:func:`resolve_path` to ``jaxrlhf/assets/tiny/NAME`` wherever the package is installed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Literal

import jax
import jax.numpy as jnp

logger = logging.getLogger("jaxrlhf.stages")

TINY_PREFIX = "tiny:"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Where the weights come from: ``path`` (a HF model directory or a stage checkpoint directory), or,
    when ``path`` is null, a fresh random model built from ``spec`` (ModelSpec fields) or ``hf_config`` (a
    Hugging Face ``config.json`` mapping of any supported family, e.g. T5's ``d_model``, ``d_kv`` ...);
    ``vocab_size`` and the special token ids default to the tokenizer's.

    ``dtype``: parameter dtype; ``compute_dtype``: activation dtype (e.g. bfloat16 over f32 master weights).
    ``attention_impl``: ``auto`` = the fused (cuDNN) kernel where it serves the dtype and device, the plain
    path elsewhere (the choice is logged); ``plain`` / ``fused`` force one.
    """

    path: str | None = None
    spec: dict[str, Any] | None = None
    hf_config: dict[str, Any] | None = None
    dtype: str = "float32"
    compute_dtype: str | None = None
    remat: Literal["none", "full", "save_dots"] = "none"
    attention_impl: Literal["auto", "plain", "fused"] = "auto"


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    """``path``: an HF tokenizer directory, or ``tiny`` (a SentencePiece model trained on first use from the
    bundled corpus, cached in ``cache_dir`` or ``<run dir>/tokenizer``); null = the model directory's own.
    ``trust_remote_code``: allow a tokenizer whose ``auto_map`` names Python files to import them (off:
    refused with a message; never a prompt)."""

    path: str | None = None
    pad_policy: Literal["eos", "unk", "add", "error"] = "eos"
    chat_template: str | None = None
    tiny_vocab_size: int = 320
    cache_dir: str | None = None
    trust_remote_code: bool = False


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh ``(data, fsdp, tensor)``; one axis may be -1 (all remaining devices). A parameter
    dimension that does not divide its mesh axis is replicated and logged; ``strict`` refuses instead."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    strict: bool = False


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """The ``train`` section's loop settings shared by the stages (each stage's own section adds to it).
    ``eval_batches``: null = the whole eval split; ``mesh``: the device mesh; ``progress``: a progress bar;
    ``max_nonfinite_steps``: a non-finite loss / gradient skips the update, this many in a row stop the run
    (the last good checkpoint kept; 0 = never stop)."""

    eval_every: int = 100
    eval_batches: int | None = None
    log_every: int = 10
    seed: int = 0
    mesh: MeshConfig = MeshConfig()
    tensorboard: bool = True
    progress: bool = True
    max_nonfinite_steps: int = 3


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints under ``<run dir>/checkpoints``. ``resume``: continue from the latest one (false:
    start the run over, removing its previous outputs). ``copy_base``: under LoRA, copy the frozen base into
    the stage checkpoint (default: record its path and content fingerprint in ``stage/base.json``)."""

    every: int = 100
    keep: int = 2
    resume: bool = True
    copy_base: bool = False


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """At the end: ``hf`` writes a merged HF directory (``export/hf``), ``peft`` a PEFT adapter directory
    (``export/peft``, LoRA runs only)."""

    hf: bool = True
    peft: bool = True


def resolve_path(path: str | None) -> str | None:
    """``tiny:NAME`` -> the bundled file; other paths are returned unchanged (``~`` expanded)."""
    if path is None:
        return None
    if path.startswith(TINY_PREFIX):
        from jaxrlhf.assets.tiny import asset_path

        return asset_path(path[len(TINY_PREFIX) :])
    return os.path.expanduser(path)


def run_dir(name: str, output_dir: str | None) -> str:
    """``output_dir`` or ``runs/<name>`` (created)."""
    out = os.path.abspath(output_dir or os.path.join("runs", name))
    os.makedirs(out, exist_ok=True)
    return out


def is_stage_checkpoint(path: str | None) -> bool:
    return path is not None and os.path.isfile(os.path.join(path, "stage.json"))


def load_tokenizer(cfg: TokenizerConfig, model_path: str | None, out_dir: str):
    """The tokenizer of a run (see :class:`TokenizerConfig`)."""
    from jaxrlhf import data

    path = cfg.path
    if path == "tiny":
        from jaxrlhf.assets.tiny import tokenizer_dir

        path = tokenizer_dir(cfg.cache_dir or os.path.join(out_dir, "tokenizer"), cfg.tiny_vocab_size)
    elif path is None:
        if model_path is None:
            raise ValueError("tokenizer.path is null and model.path is null: name a tokenizer (or 'tiny')")
        path = os.path.join(model_path, "tokenizer") if is_stage_checkpoint(model_path) else model_path
    return data.load_tokenizer(
        resolve_path(path),
        pad_policy=cfg.pad_policy,
        chat_template=cfg.chat_template,
        trust_remote_code=cfg.trust_remote_code,
    )


def spec_from_config(spec: dict[str, Any], tokenizer) -> Any:
    """A ModelSpec from the ``model.spec`` mapping; vocab and special ids default to the tokenizer's."""
    from jaxrlhf.models.spec import ModelSpec

    fields = {f.name for f in dataclasses.fields(ModelSpec)}
    unknown = sorted(set(spec) - fields)
    if unknown:
        import difflib

        from jaxrlhf.config import ConfigError

        hints = [
            f"{k!r}"
            + (f" (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, fields, 1, 0.6)) else "")
            for k in unknown
        ]
        raise ConfigError(f"model.spec: unknown ModelSpec field(s) {', '.join(hints)}")
    d = dict(spec)
    d.setdefault("vocab_size", tokenizer.vocab_size)
    d.setdefault("bos_token_id", tokenizer.bos_token_id)
    d.setdefault("eos_token_ids", (tokenizer.eos_token_id,))
    d.setdefault("pad_token_id", tokenizer.pad_token_id)
    d["eos_token_ids"] = tuple(d["eos_token_ids"])
    if d.get("rope_scaling") is not None:
        d["rope_scaling"] = tuple(sorted(dict(d["rope_scaling"]).items()))
    if d.get("model_type") == "t5":
        d.setdefault("num_decoder_layers", d.get("num_layers", 0))
        d.setdefault("decoder_start_token_id", tokenizer.pad_token_id)
    if d["vocab_size"] < tokenizer.vocab_size:
        raise ValueError(
            f"model.spec.vocab_size={d['vocab_size']} < the tokenizer's {tokenizer.vocab_size} ids"
        )
    return ModelSpec(**d)


def spec_from_hf(hf_config: dict[str, Any], tokenizer) -> Any:
    """A ModelSpec from a HF ``config.json`` mapping; vocab and special ids default to the tokenizer's."""
    from jaxrlhf.models.spec import ModelSpec

    d = {
        "vocab_size": tokenizer.vocab_size,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "decoder_start_token_id": tokenizer.pad_token_id,
        **hf_config,
    }
    return ModelSpec.from_hf_config(d, source="model.hf_config")


def make_mesh(cfg: MeshConfig):
    from jaxrlhf import sharding

    return sharding.make_mesh(cfg.data, cfg.fsdp, cfg.tensor)


def dtype_of(name: str | None) -> Any:
    return None if name is None else jnp.dtype(name)


# LoRA adapters (and a LoRA reward model's head) are trained in float32 whatever the base's dtype, as peft's
# autocast_adapter_dtype keeps them: in bf16 an Adam update lr * m / sqrt(v) below 2^-8 of the weight rounds
# away, and the adapters' moments lose the same bits. They are cast to the compute dtype at use (and once
# per rollout for decoding); the frozen base keeps model.dtype. Costs 2 bytes per adapter weight.
ADAPTER_DTYPE = jnp.float32


def is_primary() -> bool:
    """Process 0: the one that writes logs, config copies and exports."""
    return jax.process_index() == 0


def write_json(path: str, obj: Any) -> None:
    """Write JSON atomically (process 0 only)."""
    if jax.process_index() != 0:
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def load_model(cfg: ModelConfig, model_path: str | None, tokenizer, mesh, rng: jax.Array) -> tuple[Any, Any]:
    """``(spec, params)`` from a stage checkpoint (adapters merged in), a HF directory, or ``cfg.spec``."""
    from jaxrlhf import models

    dtype = dtype_of(cfg.dtype)
    if sum(x is not None for x in (model_path, cfg.spec, cfg.hf_config)) > 1:
        raise ValueError("set only one of model.path, model.spec and model.hf_config")
    if model_path is not None:
        if is_stage_checkpoint(model_path):
            from jaxrlhf import lora, train

            ckpt = train.load_stage(model_path, mesh=mesh, dtype=dtype)
            params = ckpt.params
            if ckpt.lora is not None:
                params = lora.merge(params, ckpt.lora, ckpt.lora_config)
            spec = ckpt.spec
        else:
            spec, params = models.load_pretrained(model_path, dtype=dtype, mesh=mesh)
    elif cfg.spec is not None or cfg.hf_config is not None:
        spec = (
            spec_from_config(cfg.spec, tokenizer)
            if cfg.spec is not None
            else spec_from_hf(cfg.hf_config, tokenizer)
        )
        params = models.init_params(spec, rng, dtype, mesh=mesh)
    else:
        raise ValueError("set model.path (HF directory or stage checkpoint), or model.spec / model.hf_config")
    if spec.vocab_size < tokenizer.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is {spec.vocab_size}"
        )
    return spec, params


def data_config(cfg: Any, out_dir: str) -> Any:
    """The stage's DataConfig with ``tiny:`` paths resolved and the cache under the run directory."""
    cache = cfg.cache_dir or os.path.join(out_dir, "cache")
    os.makedirs(cache, exist_ok=True)
    return dataclasses.replace(cfg, path=resolve_path(cfg.path), cache_dir=cache)
