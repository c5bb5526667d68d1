"""KL penalties between the policy and the reference model, and the adaptive KL coefficient.

Tokens are sampled from the policy pi; with log r = log pi(x) - log ref(x) the per-token estimators of
KL(pi || ref) = E_pi[log r] are (Schulman, "Approximating KL divergence", 2020):

    k1   log r                       unbiased, high variance, can be negative
    k2   1/2 (log r)^2               biased (E[k2] is an f-divergence that matches KL to second order), >= 0
    k3   (1/r - 1) + log r           unbiased (E_pi[1/r] = 1), >= 0, low variance
    abs  |log r|                     biased, >= 0 (TRL's "abs")
    mse  1/2 (log r)^2               TRL's name for k2

Adaptive coefficient (Ziegler et al. 2019, TRL's AdaptiveKLController):

    e       = clip(KL / target - 1, -0.2, 0.2)
    kl_coef = kl_coef * (1 + e * n_steps / horizon)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

KL_ESTIMATORS = ("k1", "k2", "k3", "abs", "mse")


def kl_penalty(logprobs: jax.Array, ref_logprobs: jax.Array, *, estimator: str = "k1") -> jax.Array:
    """Per-token KL estimate [...] from log pi and log ref of the sampled tokens (module docstring)."""
    log_r = logprobs.astype(jnp.float32) - ref_logprobs.astype(jnp.float32)
    if estimator == "k1":
        return log_r
    if estimator in ("k2", "mse"):
        return 0.5 * jnp.square(log_r)
    if estimator == "k3":
        return jnp.expm1(-log_r) + log_r
    if estimator == "abs":
        return jnp.abs(log_r)
    raise ValueError(f"kl_penalty: unknown estimator {estimator!r}; choose one of {KL_ESTIMATORS}")


class KLControllerState(NamedTuple):
    kl_coef: jax.Array  # scalar float32


class KLController(NamedTuple):
    """``init() -> KLControllerState``; ``update(state, kl, n_steps) -> KLControllerState``."""

    init: Callable[[], KLControllerState]
    update: Callable[[KLControllerState, jax.Array, jax.Array | int], KLControllerState]


def adaptive_kl_controller(init_kl_coef: float, *, target: float, horizon: float) -> KLController:
    """Ziegler et al.'s proportional controller driving the measured KL towards ``target``.

    ``update(state, kl, n_steps)``: ``kl`` is the mean sequence KL of the last batch, ``n_steps`` the number
    of samples (episodes) it covered; ``horizon`` is how many samples the controller needs to correct a 20%
    error.
    """
    if target <= 0 or horizon <= 0:
        raise ValueError(f"adaptive_kl_controller: target ({target}) and horizon ({horizon}) must be > 0")

    def init() -> KLControllerState:
        return KLControllerState(kl_coef=jnp.asarray(init_kl_coef, jnp.float32))

    def update(state: KLControllerState, kl: jax.Array, n_steps: jax.Array | int) -> KLControllerState:
        error = jnp.clip(jnp.asarray(kl, jnp.float32) / target - 1.0, -0.2, 0.2)
        mult = 1.0 + error * jnp.asarray(n_steps, jnp.float32) / horizon
        return KLControllerState(kl_coef=state.kl_coef * mult)

    return KLController(init=init, update=update)


def fixed_kl_controller(kl_coef: float) -> KLController:
    """A constant coefficient with the same interface as :func:`adaptive_kl_controller`."""

    def init() -> KLControllerState:
        return KLControllerState(kl_coef=jnp.asarray(kl_coef, jnp.float32))

    def update(state: KLControllerState, kl: jax.Array, n_steps: jax.Array | int) -> KLControllerState:
        del kl, n_steps
        return state

    return KLController(init=init, update=update)
