"""Generalised Advantage Estimation (Schulman et al. 2016) over padded token sequences.

For rewards r_t, values V_t and a mask m_t (1 = a token the policy generated, 0 = padding), per row:

    delta_t = r_t + gamma * m_{t+1} V_{t+1} - V_t
    A_t     = delta_t + gamma * lam * m_{t+1} A_{t+1}          (A_T = 0, m_T = 0)
    R_t     = A_t + V_t                                          (the value target, "returns")

and A_t = R_t = 0 where m_t = 0. The factor m_{t+1} means the value of a padding position is never
bootstrapped: the episode ends at the last valid token (and, more generally, at every 0 in the mask), so
right padding, left padding and prompt tokens masked out in front all work. The recursion runs as one
reverse ``lax.scan`` over time (vectorised over the batch).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def gae(
    rewards: jax.Array,  # [B, T]
    values: jax.Array,  # [B, T]
    mask: jax.Array,  # [B, T]
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[jax.Array, jax.Array]:
    """Advantages and returns [B, T] (float32, gradients stopped); see the module docstring for the math."""
    if not rewards.shape == values.shape == mask.shape or rewards.ndim != 2:
        raise ValueError(
            f"gae: rewards {rewards.shape}, values {values.shape}, mask {mask.shape} must be [B, T]"
        )
    m = mask.astype(jnp.float32)
    r = jnp.where(m > 0, rewards.astype(jnp.float32), 0.0)
    v = jnp.where(m > 0, values.astype(jnp.float32), 0.0)
    # next-step values and masks, with a zero column appended at the end of time
    m_next = jnp.concatenate([m[:, 1:], jnp.zeros_like(m[:, :1])], axis=1)
    v_next = jnp.concatenate([v[:, 1:], jnp.zeros_like(v[:, :1])], axis=1)
    delta = r + gamma * m_next * v_next - v

    def step(adv_next, xs):
        delta_t, m_t, m_next_t = xs
        adv_t = (delta_t + gamma * lam * m_next_t * adv_next) * m_t
        return adv_t, adv_t

    xs = (delta.T, m.T, m_next.T)  # time-major [T, B]
    _, adv = jax.lax.scan(step, jnp.zeros_like(m[:, 0]), xs, reverse=True)
    advantages = adv.T
    returns = (advantages + v) * m
    return jax.lax.stop_gradient(advantages), jax.lax.stop_gradient(returns)
