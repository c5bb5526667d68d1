"""Exponential moving average of the policy parameters (DeepSpeed-Chat's ``--enable_ema``).

After every optimizer step, with decay d in [0, 1):

    ema_{k+1} = d * ema_k + (1 - d) * params_{k+1},        ema_0 = params_0

so with constant params p after k steps ema_k = d^k ema_0 + (1 - d^k) p, and d = 0 copies the params. No bias
correction (DeepSpeed-Chat's ``moving_average``). The math runs in float32 and the EMA keeps its leaves'
dtypes. When enabled, the EMA (not the raw params) is what a PPO run exports.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class EMAState(NamedTuple):
    params: Any  # same tree (and shardings) as the tracked params


class EMA(NamedTuple):
    """``init(params) -> EMAState``; ``update(state, params) -> EMAState``."""

    init: Callable[[Any], EMAState]
    update: Callable[[EMAState, Any], EMAState]


def ema(decay: float) -> EMA:
    """The (init, update) pair of an EMA with ``decay`` (module docstring)."""
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"ema: decay must be in [0, 1), got {decay}")

    def init(params: Any) -> EMAState:
        return EMAState(params=jax.tree.map(jnp.copy, params))

    def update(state: EMAState, params: Any) -> EMAState:
        def mix(e, p):
            out = decay * e.astype(jnp.float32) + (1.0 - decay) * p.astype(jnp.float32)
            return out.astype(e.dtype)

        return EMAState(params=jax.tree.map(mix, state.params, params))

    return EMA(init=init, update=update)
