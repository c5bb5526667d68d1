"""PPO clipped surrogate losses for the policy and the value head (Schulman et al. 2017; Ziegler et al. 2019).

Per token, with ratio rho_t = exp(log pi(a_t) - log pi_old(a_t)), advantage A_t, clip range eps:

    policy:  l_t = max(-A_t rho_t, -A_t clip(rho_t, 1 - eps_low, 1 + eps_high))
    dual:    l_t = min(l_t, -c A_t)   where A_t < 0            (Ye et al. 2020, "dual clip", c > 1)
    value:   V^clip_t = V_old_t + clip(V_t - V_old_t, -eps_v, eps_v)
             l_t = 1/2 max((V_t - R_t)^2, (V^clip_t - R_t)^2)

Dual clip bounds the loss of a token with a negative advantage whose ratio has exploded (rho > c): without it
l_t = -A_t rho_t grows without limit. Both losses are aggregated over the mask by
:func:`jaxrlhf.losses.aggregate_loss` (``loss_agg``: token mean, default, or sequence mean; ``denominator``
for exact gradient accumulation). ``clip_eps_high`` (DAPO's "clip-higher") defaults to ``clip_eps``.
Metrics follow TRL's names where they exist; they are token means over the mask.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ._aggregate import aggregate_loss
from ._masked import masked_mean


def ppo_policy_terms(
    logprobs: jax.Array,  # [B, T] under the current policy
    old_logprobs: jax.Array,  # [B, T] under the policy that sampled the tokens
    advantages: jax.Array,  # [B, T]
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-token policy loss ``l_t`` [B, T] (module docstring) and per-token diagnostics [B, T]:
    ``clipped`` (the clipped branch is taken), ``dual_clipped``, ``log_ratio``, ``ratio``."""
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"ppo_policy_loss: dual_clip must be > 1 (Ye et al. 2020), got {dual_clip}")
    high = clip_eps if clip_eps_high is None else clip_eps_high
    log_ratio = logprobs.astype(jnp.float32) - jax.lax.stop_gradient(old_logprobs.astype(jnp.float32))
    ratio = jnp.exp(log_ratio)
    adv = jax.lax.stop_gradient(advantages.astype(jnp.float32))
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + high)
    per_token = jnp.maximum(unclipped, clipped)
    dual = jnp.zeros_like(per_token, dtype=bool)
    if dual_clip is not None:
        cap = -dual_clip * adv
        dual = (adv < 0) & (per_token > cap)
        per_token = jnp.where(adv < 0, jnp.minimum(per_token, cap), per_token)
    terms = {"clipped": clipped > unclipped, "dual_clipped": dual, "log_ratio": log_ratio, "ratio": ratio}
    return per_token, terms


def ppo_policy_loss(
    logprobs: jax.Array,  # [B, T] under the current policy
    old_logprobs: jax.Array,  # [B, T] under the policy that sampled the tokens
    advantages: jax.Array,  # [B, T]
    mask: jax.Array,  # [B, T]
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    loss_agg: str = "token_mean",
    denominator: jax.Array | float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped surrogate policy loss (module docstring). Metrics: ``clipfrac`` (fraction of tokens where
    the clipped branch is taken), ``dual_clipfrac``, ``approx_kl`` (mean 1/2 (log rho)^2), ``ratio``."""
    per_token, t = ppo_policy_terms(
        logprobs,
        old_logprobs,
        advantages,
        clip_eps=clip_eps,
        clip_eps_high=clip_eps_high,
        dual_clip=dual_clip,
    )
    loss = aggregate_loss(per_token, mask, loss_agg=loss_agg, denominator=denominator)
    metrics = {
        "clipfrac": masked_mean(t["clipped"].astype(jnp.float32), mask),
        "dual_clipfrac": masked_mean(t["dual_clipped"].astype(jnp.float32), mask),
        "approx_kl": masked_mean(0.5 * jnp.square(t["log_ratio"]), mask),
        "ratio": masked_mean(t["ratio"], mask),
    }
    return loss, jax.lax.stop_gradient(metrics)


def ppo_value_terms(
    values: jax.Array,  # [B, T] current value head
    old_values: jax.Array,  # [B, T] values at rollout time
    returns: jax.Array,  # [B, T] GAE returns
    *,
    clip_eps: float | None = 0.2,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-token value loss [B, T] (module docstring; ``clip_eps=None``: plain 1/2 (V - R)^2) and per-token
    ``clipped`` / ``error`` ((V - R)^2) diagnostics."""
    v = values.astype(jnp.float32)
    ret = jax.lax.stop_gradient(returns.astype(jnp.float32))
    err = jnp.square(v - ret)
    if clip_eps is None:
        return 0.5 * err, {"clipped": jnp.zeros_like(err, dtype=bool), "error": err}
    old = jax.lax.stop_gradient(old_values.astype(jnp.float32))
    v_clipped = old + jnp.clip(v - old, -clip_eps, clip_eps)
    err_clipped = jnp.square(v_clipped - ret)
    return 0.5 * jnp.maximum(err, err_clipped), {"clipped": err_clipped > err, "error": err}


def ppo_value_loss(
    values: jax.Array,  # [B, T] current value head
    old_values: jax.Array,  # [B, T] values at rollout time
    returns: jax.Array,  # [B, T] GAE returns
    mask: jax.Array,  # [B, T]
    *,
    clip_eps: float | None = 0.2,
    loss_agg: str = "token_mean",
    denominator: jax.Array | float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped value loss (module docstring). Metrics: ``vf_clipfrac``, ``value_mean``, ``value_error``
    (mean squared error of the unclipped values)."""
    per_token, t = ppo_value_terms(values, old_values, returns, clip_eps=clip_eps)
    loss = aggregate_loss(per_token, mask, loss_agg=loss_agg, denominator=denominator)
    metrics = {
        "vf_clipfrac": masked_mean(t["clipped"].astype(jnp.float32), mask),
        "value_mean": masked_mean(values.astype(jnp.float32), mask),
        "value_error": masked_mean(t["error"], mask),
    }
    return loss, jax.lax.stop_gradient(metrics)
