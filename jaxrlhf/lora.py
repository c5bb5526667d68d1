"""LoRA: low-rank adapters kept in their own pytree (the ``lora`` collection), never merged while training.

An adapted Dense layer computes (``models.forward(..., lora=adapters, lora_config=config)``)::

    y = x W + s * dropout(x) A B,     A = lora_a [in, r],  B = lora_b [r, out],
    s = alpha / r  (or alpha / sqrt(r) with use_rslora)

``adapters`` mirrors the params paths of the adapted layers: ``adapters["layers_3"]["attn"]["q_proj"] =
{"lora_a", "lora_b"}``. ``B`` starts at zero and ``A`` is Kaiming-uniform like peft (``U(-1/sqrt(in),
1/sqrt(in))``), so a fresh adapter is the base model; omitting the adapters (``lora=None``) *is* the base
model.
The optimizer sees only ``adapters`` (``TrainState.params``); the base sits in ``TrainState.frozen``.

Targets (``LoraConfig.targets``), each one of:
  - ``"all-linear"``: every Dense kernel except the output head (peft's meaning);
  - a short module name, ours or Hugging Face's (``"q_proj"``, ``"o_proj"``/``"out_proj"``, ``"fc1"``,
    ``"c_proj"``): every layer whose last path component (or HF module name) equals it;
  - otherwise a regex, ``re.fullmatch``-ed against our module paths (``r"layers_\\d+/attn/(q|k|v|o)_proj"``).

PEFT export / import (:func:`save_peft`, :func:`load_peft`, in ``jaxrlhf/_peft.py``) map our module paths
onto Hugging Face module names through the models' weight specs, for every family (llama, mistral, opt,
bloom, gpt2, t5); GPT-2 / BLOOM q, k, v become one exact adapter on the fused ``c_attn`` /
``query_key_value`` module (block-diagonal B, peft ``rank_pattern``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_SHORT = re.compile(r"^[A-Za-z0-9_]+$")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Hashable LoRA hyper-parameters (usable as a static jit argument and as ``lora_config`` of forward)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    use_rslora: bool = False

    def __post_init__(self):
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        object.__setattr__(self, "targets", targets)
        if self.rank < 1:
            raise ValueError(f"LoraConfig.rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout}")
        if not targets:
            raise ValueError("LoraConfig.targets is empty")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> LoraConfig:
        d = json.loads(text)
        d["targets"] = tuple(d["targets"])
        return cls(**d)


def _linear_modules(params: dict, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Paths of every dict holding a 2-D ``kernel`` (a Dense layer)."""
    out = []
    for k, v in params.items():
        if isinstance(v, dict):
            if (
                "kernel" in v
                and len(np.shape(v["kernel"]) if not hasattr(v["kernel"], "shape") else v["kernel"].shape)
                == 2
            ):
                out.append((*prefix, k))
            out += _linear_modules(v, (*prefix, k))
    return out


def hf_module_names(spec: Any) -> dict[tuple[str, ...], str]:
    """Our Dense module path -> HF module name (``model.layers.0.self_attn.q_proj``); GPT-2 / BLOOM q, k
    and v all map to their one fused HF module (``transformer.h.0.attn.c_attn``)."""
    from jaxrlhf.models.hf_io import hf_weight_specs

    out: dict[tuple[str, ...], str] = {}
    for ws in hf_weight_specs(spec):
        if len(ws.hf_names) == 1 and ws.hf_names[0].endswith(".weight"):
            for p in ws.paths:
                if p[-1] == "kernel":
                    out[p[:-1]] = ws.hf_names[0][: -len(".weight")]
    return out


def target_modules(spec: Any, params: dict, config: LoraConfig) -> list[tuple[str, ...]]:
    """Module paths selected by ``config.targets`` (see module docstring); error if a target matches none."""
    modules = _linear_modules(params)
    hf = hf_module_names(spec) if spec is not None else {}
    chosen: set[tuple[str, ...]] = set()
    for t in config.targets:
        if t == "all-linear":
            hit = {m for m in modules if m[-1] != "lm_head"}
        elif _SHORT.match(t):
            hit = {m for m in modules if m[-1] == t or (hf.get(m) or "").split(".")[-1] == t}
        else:
            hit = {m for m in modules if re.fullmatch(t, "/".join(m))}
        if not hit:
            names = sorted({m[-1] for m in modules})
            raise ValueError(f"LoRA target {t!r} matches no linear layer (layer names: {names})")
        chosen |= hit
    return sorted(chosen, key=lambda m: modules.index(m))


def _get(tree: dict, path: tuple[str, ...]) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def init(spec: Any, params: dict, config: LoraConfig, rng: jax.Array, dtype: Any = jnp.float32) -> dict:
    """Fresh adapters for the targets: ``lora_a [in, r] ~ U(-1/sqrt(in), 1/sqrt(in))``, ``lora_b = 0``."""
    adapters: dict = {}
    for i, m in enumerate(target_modules(spec, params, config)):
        d_in, d_out = _get(params, m)["kernel"].shape
        bound = 1.0 / math.sqrt(d_in)
        a = jax.random.uniform(jax.random.fold_in(rng, i), (d_in, config.rank), dtype, -bound, bound)
        _set(adapters, m, {"lora_a": a, "lora_b": jnp.zeros((config.rank, d_out), dtype)})
    return adapters


def modules(adapters: dict) -> list[tuple[str, ...]]:
    """Paths of the adapted modules in ``adapters``."""
    out = []

    def walk(t, prefix):
        if "lora_a" in t:
            out.append(prefix)
            return
        for k, v in t.items():
            walk(v, (*prefix, k))

    walk(adapters, ())
    return out


def param_axes(base_axes: dict, adapters: dict) -> dict:
    """Logical axes from the base kernel's: ``lora_a (in, lora_rank)``, ``lora_b (lora_rank, out)``."""
    out: dict = {}
    for m in modules(adapters):
        k_in, k_out = _get(base_axes, m)["kernel"]
        _set(out, m, {"lora_a": (k_in, "lora_rank"), "lora_b": ("lora_rank", k_out)})
    return out


def merge(params: dict, adapters: dict, config: LoraConfig) -> dict:
    """Plain params with ``kernel + scale * lora_a @ lora_b`` folded in (f32 math; kernel dtype kept)."""
    merged = jax.tree.map(lambda x: x, params)
    for m in modules(adapters):
        layer = dict(_get(merged, m))
        ad = _get(adapters, m)
        delta = config.scale * (ad["lora_a"].astype(jnp.float32) @ ad["lora_b"].astype(jnp.float32))
        layer["kernel"] = (layer["kernel"].astype(jnp.float32) + delta).astype(layer["kernel"].dtype)
        _set(merged, m, layer)
    return merged


def check_adapters(params: dict, adapters: dict | None, *, where: str = "lora") -> None:
    """Raise if an adapter tree does not fit ``params``: every adapted module must be a Dense layer of the
    model (a ``kernel`` at the same path, e.g. ``layers_0/attn/q_proj``) with ``lora_a [in, r]`` and
    ``lora_b [r, out]`` of its shape. A mis-nested tree would otherwise adapt nothing: a silent base-model
    run. Fused decoding trees (``qkv_proj``) are not adapted and are not accepted here."""
    if not adapters:
        return
    for m in modules(adapters):
        name = "/".join(m)
        node: Any = params
        for k in m:
            if not isinstance(node, dict) or k not in node:
                raise ValueError(
                    f"{where}: adapter path {name!r} matches no layer of the model (no {k!r} under "
                    f"{'/'.join(m[: m.index(k)]) or 'the params root'}; adapters mirror params paths like "
                    "'layers_0/attn/q_proj')"
                )
            node = node[k]
        if not isinstance(node, dict) or "kernel" not in node or np.ndim(node["kernel"]) != 2:
            raise ValueError(f"{where}: adapter path {name!r} is not a Dense layer of the model")
        ad = _get(adapters, m)
        d_in, d_out = np.shape(node["kernel"])
        a, b = np.shape(ad["lora_a"]), np.shape(ad.get("lora_b", ()))
        if len(a) != 2 or len(b) != 2 or a[0] != d_in or b[1] != d_out or a[1] != b[0]:
            raise ValueError(
                f"{where}: adapter {name!r} has lora_a {a}, lora_b {b}; the layer's kernel is "
                f"[{d_in}, {d_out}] (expected lora_a [{d_in}, r], lora_b [r, {d_out}])"
            )
    for path, _ in jax.tree_util.tree_flatten_with_path(adapters)[0]:
        leaf = getattr(path[-1], "key", None)
        if leaf not in ("lora_a", "lora_b"):
            raise ValueError(f"{where}: unexpected leaf {jax.tree_util.keystr(path)} (only lora_a / lora_b)")


# ---------------------------------------------------------------------------------------------- peft


def save_peft(
    spec: Any, adapters: dict, config: LoraConfig, out_dir: Any, *, base_model: str | None = None
) -> str:
    """Write a peft LoRA adapter directory that ``PeftModel.from_pretrained(hf_model, out_dir)`` loads
    (see ``jaxrlhf/_peft.py``; GPT-2 / BLOOM q, k, v become one exact adapter on the fused module)."""
    from jaxrlhf import _peft

    return _peft.save_peft(spec, adapters, config, out_dir, base_model=base_model)


def load_peft(spec: Any, in_dir: Any, dtype: Any = jnp.float32) -> tuple[dict, LoraConfig]:
    """Read a peft LoRA adapter directory into ``(adapters, LoraConfig)`` (see ``jaxrlhf/_peft.py``)."""
    from jaxrlhf import _peft

    return _peft.load_peft(spec, in_dir, dtype)


__all__ = [
    "LoraConfig",
    "check_adapters",
    "hf_module_names",
    "init",
    "load_peft",
    "merge",
    "modules",
    "param_axes",
    "save_peft",
    "target_modules",
]
