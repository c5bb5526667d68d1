"""PPO clipped surrogate losses for the policy and the value head (Schulman et al. 2017; Ziegler et al. 2019).

Per token, with ratio rho_t = exp(log pi(a_t) - log pi_old(a_t)), advantage A_t, clip range eps:

    policy:  l_t = max(-A_t rho_t, -A_t clip(rho_t, 1 - eps_low, 1 + eps_high))
    value:   V^clip_t = V_old_t + clip(V_t - V_old_t, -eps_v, eps_v)
             l_t = 1/2 max((V_t - R_t)^2, (V^clip_t - R_t)^2)

and both losses are the token mean over the mask. ``clip_eps_high`` (DAPO's "clip-higher") defaults to
``clip_eps``. Metrics follow TRL's names where they exist.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ._masked import masked_mean


def ppo_policy_loss(
    logprobs: jax.Array,  # [B, T] under the current policy
    old_logprobs: jax.Array,  # [B, T] under the policy that sampled the tokens
    advantages: jax.Array,  # [B, T]
    mask: jax.Array,  # [B, T]
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped surrogate policy loss (module docstring). Metrics: ``clipfrac`` (fraction of tokens where the
    clipped branch is taken), ``approx_kl`` (mean 1/2 (log rho)^2), ``ratio`` (mean rho)."""
    high = clip_eps if clip_eps_high is None else clip_eps_high
    log_ratio = logprobs.astype(jnp.float32) - jax.lax.stop_gradient(old_logprobs.astype(jnp.float32))
    ratio = jnp.exp(log_ratio)
    adv = jax.lax.stop_gradient(advantages.astype(jnp.float32))
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + high)
    loss = masked_mean(jnp.maximum(unclipped, clipped), mask)
    metrics = {
        "clipfrac": masked_mean((clipped > unclipped).astype(jnp.float32), mask),
        "approx_kl": masked_mean(0.5 * jnp.square(log_ratio), mask),
        "ratio": masked_mean(ratio, mask),
    }
    return loss, jax.lax.stop_gradient(metrics)


def ppo_value_loss(
    values: jax.Array,  # [B, T] current value head
    old_values: jax.Array,  # [B, T] values at rollout time
    returns: jax.Array,  # [B, T] GAE returns
    mask: jax.Array,  # [B, T]
    *,
    clip_eps: float = 0.2,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped value loss (module docstring). Metrics: ``vf_clipfrac``, ``value_mean``, ``value_error``
    (mean squared error of the unclipped values)."""
    v = values.astype(jnp.float32)
    old = jax.lax.stop_gradient(old_values.astype(jnp.float32))
    ret = jax.lax.stop_gradient(returns.astype(jnp.float32))
    v_clipped = old + jnp.clip(v - old, -clip_eps, clip_eps)
    err = jnp.square(v - ret)
    err_clipped = jnp.square(v_clipped - ret)
    loss = 0.5 * masked_mean(jnp.maximum(err, err_clipped), mask)
    metrics = {
        "vf_clipfrac": masked_mean((err_clipped > err).astype(jnp.float32), mask),
        "value_mean": masked_mean(v, mask),
        "value_error": masked_mean(err, mask),
    }
    return loss, jax.lax.stop_gradient(metrics)
