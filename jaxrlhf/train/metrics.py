"""Metric sinks (JSONL file, TensorBoard when importable) and the throughput arithmetic.

Model FLOPs per trained token (forward + backward, the PaLM / nanoGPT convention used by
``baselines/hf_llama1b.py``)::

    flops_per_token = 6 N + 6 L T E        (N parameters, L layers, T sequence length, E hidden size)
    MFU = flops_per_token * tokens_per_second / peak_flops          (peak: 989e12 for H100/H200 dense bf16)
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np

PEAK_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
}


def flops_per_token(n_params: int, num_layers: int, seq_len: int, hidden_size: int) -> float:
    """``6 N + 6 L T E`` (matmul FLOPs of forward + backward per token, attention included)."""
    return 6.0 * n_params + 6.0 * num_layers * seq_len * hidden_size


def peak_flops(device_kind: str) -> float | None:
    """Dense bf16 peak of a known accelerator by ``jax.devices()[0].device_kind`` substring, else None."""
    for name, flops in PEAK_FLOPS.items():
        if name.lower() in device_kind.lower():
            return flops
    return None


def to_python(metrics: dict[str, Any]) -> dict[str, float]:
    """Device scalars -> Python floats (non-finite values kept as float('nan'/'inf'))."""
    return {k: float(np.asarray(v)) for k, v in metrics.items()}


class MetricsWriter:
    """Append ``{"step": s, **metrics}`` lines to ``<dir>/metrics.jsonl``; mirror scalars to TensorBoard.

    TensorBoard goes through ``tensorboard.summary.Writer`` (no TensorFlow needed) and is skipped silently
    when tensorboard is not installed or ``tensorboard=False``. ``keep_until``: a resumed run's step; records
    of later steps (written before the interruption and about to be replayed) are dropped from the file
    first, so every step appears once.
    """

    def __init__(
        self, log_dir: str | os.PathLike, *, tensorboard: bool = True, keep_until: int | None = None
    ):
        self.log_dir = os.fspath(log_dir)
        os.makedirs(self.log_dir, exist_ok=True)
        path = os.path.join(self.log_dir, "metrics.jsonl")
        if keep_until is not None and os.path.isfile(path):
            kept = [r for r in read_jsonl(path) if int(r.get("step", 0)) <= keep_until]
            with open(path + ".tmp", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
            os.replace(path + ".tmp", path)
        self._jsonl = open(path, "a")
        self._tb = None
        if tensorboard:
            try:
                from tensorboard.summary import Writer

                self._tb = Writer(os.path.join(self.log_dir, "tensorboard"))
            except Exception:  # tensorboard absent or incompatible: JSONL only
                self._tb = None

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        values = to_python(metrics)
        line = {"step": int(step)}
        line.update({k: (v if math.isfinite(v) else str(v)) for k, v in values.items()})
        self._jsonl.write(json.dumps(line) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, step=int(step))
            self._tb.flush()

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """All records of a metrics.jsonl file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
