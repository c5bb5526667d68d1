"""Group Relative Policy Optimisation (Shao et al. 2024, DeepSeekMath) as in TRL's GRPOTrainer.

Rewards come in groups of G completions of the same prompt, laid out prompt-major ([B*G], the G completions
of prompt b at rows b*G .. b*G+G-1). Advantages are group-normalised:

    A_i = (r_i - mean_g(r)) / (std_g(r) + eps)        (std with Bessel's correction, like torch.std)

and the per-token loss, with rho = exp(log pi - log pi_old) and the k3 KL to the reference,

    l_t = -min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A) + beta * [(ref/pi) - log(ref/pi) - 1]_t

is aggregated as
    "seq_mean":   mean_b [ sum_t m l / sum_t m ]         (original GRPO)
    "token_mean": sum_bt m l / sum_bt m                  (DAPO / BNPO)
    "dr_grpo":    sum_bt m l / (B * T)                   (Dr. GRPO: constant normaliser, no length bias)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ._kl import kl_penalty
from ._masked import masked_mean

GRPO_LOSS_AGGREGATIONS = ("seq_mean", "token_mean", "dr_grpo")


def grpo_advantages(
    rewards: jax.Array,  # [B*G]
    group_size: int,
    *,
    scale: bool = True,
    eps: float = 1e-4,
) -> jax.Array:
    """Group-relative advantages [B*G] (module docstring); ``scale=False`` only subtracts the group mean."""
    if rewards.ndim != 1 or rewards.shape[0] % group_size:
        raise ValueError(f"grpo_advantages: rewards {rewards.shape} is not [B * group_size={group_size}]")
    if group_size < 2 and scale:
        raise ValueError("grpo_advantages: group_size must be >= 2 to scale by the group std")
    r = rewards.astype(jnp.float32).reshape(-1, group_size)
    centered = r - jnp.mean(r, axis=1, keepdims=True)
    if scale:
        centered = centered / (jnp.std(r, axis=1, ddof=1, keepdims=True) + eps)
    return jax.lax.stop_gradient(centered.reshape(-1))


def grpo_loss(
    logprobs: jax.Array,  # [N, T] current policy
    old_logprobs: jax.Array,  # [N, T] sampling policy
    ref_logprobs: jax.Array | None,  # [N, T] reference (None when beta == 0)
    advantages: jax.Array,  # [N] one per completion
    mask: jax.Array,  # [N, T]
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    beta: float = 0.04,
    loss_agg: str = "seq_mean",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """GRPO clipped loss with a k3 KL penalty (module docstring). Metrics: ``clipfrac``, ``kl``, ``ratio``."""
    if loss_agg not in GRPO_LOSS_AGGREGATIONS:
        raise ValueError(f"grpo_loss: unknown loss_agg {loss_agg!r}; choose one of {GRPO_LOSS_AGGREGATIONS}")
    high = clip_eps if clip_eps_high is None else clip_eps_high
    m = mask.astype(jnp.float32)
    lp = logprobs.astype(jnp.float32)
    ratio = jnp.exp(lp - jax.lax.stop_gradient(old_logprobs.astype(jnp.float32)))
    adv = jax.lax.stop_gradient(advantages.astype(jnp.float32))[:, None]
    unclipped = ratio * adv
    clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + high) * adv
    per_token = -jnp.minimum(unclipped, clipped)
    kl = jnp.zeros_like(lp)
    if beta:
        if ref_logprobs is None:
            raise ValueError("grpo_loss: ref_logprobs is required when beta != 0")
        kl = kl_penalty(lp, jax.lax.stop_gradient(ref_logprobs), estimator="k3")
        per_token = per_token + beta * kl
    per_token = jnp.where(m > 0, per_token, 0.0)
    if loss_agg == "seq_mean":
        loss = jnp.mean(jnp.sum(per_token, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0))
    elif loss_agg == "token_mean":
        loss = jnp.sum(per_token) / jnp.maximum(jnp.sum(m), 1.0)
    else:
        loss = jnp.sum(per_token) / per_token.size
    metrics = {
        "clipfrac": masked_mean((clipped < unclipped).astype(jnp.float32), m),
        "kl": masked_mean(kl, m),
        "ratio": masked_mean(ratio, m),
    }
    return loss, jax.lax.stop_gradient(metrics)
