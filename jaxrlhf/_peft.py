"""PEFT LoRA directories (``adapter_config.json`` + ``adapter_model.safetensors``) <-> jaxrlhf adapters.

Names: ``base_model.model.<HF module>.lora_A.weight [r, in]`` and ``...lora_B.weight [out, r]``, HF module
names from the models' weight specs, so every family works:

- one HF ``nn.Linear`` / ``Conv1D`` per Dense layer (llama, mistral, opt, t5, and all but q/k/v of gpt2 and
  bloom): ``lora_A = lora_a.T``, ``lora_B = lora_b.T``;
- GPT-2 ``c_attn`` / BLOOM ``query_key_value`` hold q, k and v in one HF tensor. Adapters on a subset S of
  them become one exact adapter of rank ``|S| r`` on the fused module: ``A = [a_q^T; a_k^T; a_v^T]`` and ``B``
  block-diagonal (``B_j`` in the rows of part j, laid out by the fused tensor's own save function), with
  peft's ``rank_pattern`` / ``alpha_pattern`` keeping the scale. Loading a fused adapter of rank R gives every
  part the shared ``A`` (rank R) and its rows of ``B`` — the same function, not necessarily the same tree.

GPT-2 modules are ``Conv1D`` (``fan_in_fan_out=True`` in the config; the A/B tensors keep peft's layout).
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf.lora import LoraConfig, modules


def _layout(spec: Any) -> tuple[dict, dict]:
    """``single``: our module path -> HF module; ``fused``: HF module -> (WeightSpec, [our module paths])."""
    from jaxrlhf.models.hf_io import hf_weight_specs

    single, fused = {}, {}
    for ws in hf_weight_specs(spec):
        if len(ws.hf_names) != 1 or not ws.hf_names[0].endswith(".weight"):
            continue
        kernels = [p[:-1] for p in ws.paths if p[-1] == "kernel"]
        hf = ws.hf_names[0][: -len(".weight")]
        if len(kernels) == 1 and len(ws.paths) == 1:
            single[kernels[0]] = hf
        elif kernels:
            fused[hf] = (ws, kernels)
    return single, fused


def _out_dim(spec: Any, module: tuple[str, ...]) -> int:
    heads = {"q_proj": spec.num_heads, "k_proj": spec.num_kv_heads, "v_proj": spec.num_kv_heads}
    if module[-1] not in heads:
        raise ValueError(f"cannot size fused part {'/'.join(module)}")
    return heads[module[-1]] * spec.head_dim


def _scale(config_alpha: float, rank: int, rslora: bool) -> float:
    return config_alpha / (math.sqrt(rank) if rslora else rank)


def _np(x) -> np.ndarray:
    return np.asarray(jax.device_get(x), np.float32)


def save_peft(
    spec: Any,
    adapters: dict,
    config: LoraConfig,
    out_dir: str | os.PathLike,
    *,
    base_model: str | None = None,
) -> str:
    """Write a peft LoRA adapter directory that ``PeftModel.from_pretrained(hf_model, out_dir)`` loads."""
    from safetensors.numpy import save_file

    from jaxrlhf.lora import _get

    single, fused = _layout(spec)
    adapted = set(modules(adapters))
    fan_in_fan_out = spec.model_type == "gpt2"
    tensors, targets, rank_pattern, alpha_pattern = {}, [], {}, {}
    for m in sorted(adapted & set(single)):
        ad, hf = _get(adapters, m), single[m]
        tensors[f"base_model.model.{hf}.lora_A.weight"] = np.ascontiguousarray(_np(ad["lora_a"]).T)
        tensors[f"base_model.model.{hf}.lora_B.weight"] = np.ascontiguousarray(_np(ad["lora_b"]).T)
        targets.append(hf)
    for hf, (ws, parts) in fused.items():
        present = [p for p in parts if p in adapted]
        if not present:
            continue
        r = config.rank
        big = len(present) * r
        a = np.concatenate([_np(_get(adapters, p)["lora_a"]).T for p in present], axis=0)  # [R, in]
        blocks = []
        for p in parts:
            k = np.zeros((big, _out_dim(spec, p)), np.float32)
            if p in present:
                i = present.index(p)
                k[i * r : (i + 1) * r] = _np(_get(adapters, p)["lora_b"])
            blocks.append(k)
        b = ws.save(blocks)[0]  # the fused HF tensor's layout: Linear [out, R], Conv1D [R, out]
        b = b.T if fan_in_fan_out else b
        tensors[f"base_model.model.{hf}.lora_A.weight"] = np.ascontiguousarray(a)
        tensors[f"base_model.model.{hf}.lora_B.weight"] = np.ascontiguousarray(b)
        targets.append(hf)
        if big != r:
            key = re.escape(hf)
            rank_pattern[key] = big
            alpha_pattern[key] = config.scale * (math.sqrt(big) if config.use_rslora else big)
    missing = sorted(
        "/".join(m) for m in adapted if m not in single and not any(m in f[1] for f in fused.values())
    )
    if missing:
        raise ValueError(f"{spec.model_type}: adapters on {missing} have no Hugging Face module to export to")
    cfg = {
        "peft_type": "LORA",
        "task_type": "SEQ_2_SEQ_LM" if spec.is_encoder_decoder else "CAUSAL_LM",
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.use_rslora,
        # exact module names: peft adapts precisely these (a name matches itself or a ".name" suffix)
        "target_modules": sorted(targets),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "inference_mode": True,
        "init_lora_weights": True,
        "base_model_name_or_path": base_model,
        "modules_to_save": None,
    }
    out = os.fspath(out_dir)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "adapter_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    save_file(tensors, os.path.join(out, "adapter_model.safetensors"))
    return out


def _pattern(patterns: dict, hf: str, default):
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", hf):  # peft's get_pattern_key
            return value
    return default


def load_peft(spec: Any, in_dir: str | os.PathLike, dtype: Any = jnp.float32) -> tuple[dict, LoraConfig]:
    """Read a peft LoRA adapter directory into ``(adapters, LoraConfig)``; see the module docstring."""
    from safetensors.numpy import load_file

    d = os.fspath(in_dir)
    cfg_file = os.path.join(d, "adapter_config.json")
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"{d}: no adapter_config.json (not a peft adapter directory)")
    with open(cfg_file) as f:
        c = json.load(f)
    if c.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{cfg_file}: peft_type {c.get('peft_type')!r} is not LORA")
    weights_file = os.path.join(d, "adapter_model.safetensors")
    if not os.path.isfile(weights_file):
        raise FileNotFoundError(f"{d}: no adapter_model.safetensors")
    r, alpha, rslora = int(c["r"]), float(c["lora_alpha"]), bool(c.get("use_rslora", False))
    config_scale = _scale(alpha, r, rslora)
    tensors = load_file(weights_file)
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for name, arr in tensors.items():
        mt = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])(?:\.default)?\.weight", name)
        if mt is None:
            raise ValueError(f"{weights_file}: unexpected tensor {name!r}")
        pairs.setdefault(mt.group(1), {})[mt.group(2)] = arr.astype(np.float32)
    single, fused = _layout(spec)
    by_hf = {hf: m for m, hf in single.items()}
    adapters: dict = {}
    names: set[str] = set()

    def put(m, a, b):
        layer = adapters
        for k in m:
            layer = layer.setdefault(k, {})
        layer.update(lora_a=jnp.asarray(a, dtype), lora_b=jnp.asarray(b, dtype))
        names.add(m[-1])

    for hf, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{weights_file}: module {hf!r} lacks lora_A or lora_B")
        rank = ab["A"].shape[0]
        # fold a per-module scale (rank_pattern / alpha_pattern) into B so one config scale serves all
        s = _scale(
            _pattern(c.get("alpha_pattern") or {}, hf, alpha),
            _pattern(c.get("rank_pattern") or {}, hf, r),
            rslora,
        )
        a, b = ab["A"].T, ab["B"].T * (s / config_scale)  # [in, R], [R, out]
        if hf in by_hf:
            put(by_hf[hf], a, b)
        elif hf in fused:
            ws, parts = fused[hf]
            hf_b = b if spec.model_type == "gpt2" else b.T  # back to the fused tensor's layout
            for p, block in zip(parts, ws.load([hf_b]), strict=True):
                if block.shape[0] != rank:
                    raise ValueError(f"{weights_file}: {hf}: lora_B does not fit rank {rank}")
                put(p, a, block)
        else:
            raise ValueError(f"{weights_file}: module {hf!r} is not a linear layer of {spec.model_type}")
    config = LoraConfig(
        rank=r,
        alpha=alpha,
        dropout=float(c.get("lora_dropout", 0.0)),
        targets=tuple(sorted(names)),
        use_rslora=rslora,
    )
    return adapters, config
