"""How Hugging Face tensors map onto jaxrlhf params: one small record per (group of) tensors.

Each family module returns a list of :class:`WeightSpec` for a ModelSpec; ``hf_io`` streams tensors from
safetensors through ``load`` (possibly straight onto a mesh) and writes them back through ``save``. A
record may read several HF tensors and/or fill several params (BLOOM's fused QKV is one HF tensor -> three
params), so both directions take and return lists in the order of ``hf_names`` / ``paths``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    hf_names: tuple[str, ...]  # names inside the HF state dict (with the CausalLM / Seq2SeqLM prefix)
    paths: tuple[Path, ...]  # param paths, e.g. ("layers_0", "attn", "q_proj", "kernel")
    load: Callable[[list[np.ndarray]], list[np.ndarray]]  # HF tensors -> param arrays
    save: Callable[[list[np.ndarray]], list[np.ndarray]]  # param arrays -> HF tensors


def _ident(xs: list[np.ndarray]) -> list[np.ndarray]:
    return list(xs)


def _transpose(xs: list[np.ndarray]) -> list[np.ndarray]:
    return [np.ascontiguousarray(x.T) for x in xs]


def copy(hf_name: str, path: Path) -> WeightSpec:
    """Same layout on both sides (embeddings, norms, biases, GPT-2 Conv1D kernels)."""
    return WeightSpec((hf_name,), (path,), _ident, _ident)


def linear(hf_name: str, path: Path) -> WeightSpec:
    """torch ``nn.Linear.weight`` [out, in] <-> Flax kernel [in, out]."""
    return WeightSpec((hf_name,), (path,), _transpose, _transpose)
