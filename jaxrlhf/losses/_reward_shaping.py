"""Per-token PPO rewards from sequence scores and the KL to the reference (Ziegler et al. 2019; InstructGPT).

With a sequence score s_b (reward model and/or functions), a per-token KL estimate kl_bt between the sampling
policy and the reference (``kl_penalty``, usually k1 = log pi - log ref), the KL coefficient beta and the
completion mask m_bt:

    r_bt = -beta * kl_bt * m_bt  +  s_b * [t = t*_b]          t*_b = max { t : m_bt = 1 }

so the score arrives at the last valid token (left or right padding alike) and padding gets 0; a row with an
empty mask gets no score. Scores are normalised by running statistics (``running_reward_normalizer`` +
``normalize_rewards``; :func:`seeded_reward_stats` starts them from the reward model's ``reward_stats``) and
clipped to [-c, c] (:func:`clip_rewards`) before they enter r.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ._reward import RunningStats


def token_rewards(
    scores: jax.Array,  # [B]
    kl: jax.Array,  # [B, T] per-token KL estimate
    mask: jax.Array,  # [B, T]
    *,
    kl_coef: jax.Array | float,
) -> jax.Array:
    """Per-token rewards [B, T] float32 (module docstring)."""
    if kl.shape != mask.shape or scores.shape != kl.shape[:1]:
        raise ValueError(f"token_rewards: scores {scores.shape}, kl {kl.shape}, mask {mask.shape} disagree")
    m = mask.astype(jnp.float32)
    t = jnp.arange(m.shape[1], dtype=jnp.int32)
    last = jnp.max(jnp.where(m > 0, t, -1), axis=1)  # -1 for an empty row: no token gets the score
    at_last = (t[None, :] == last[:, None]).astype(jnp.float32)
    penalty = -jnp.asarray(kl_coef, jnp.float32) * jnp.where(m > 0, kl.astype(jnp.float32), 0.0)
    return penalty + scores.astype(jnp.float32)[:, None] * at_last


def clip_rewards(rewards: jax.Array, *, clip: float | None) -> jax.Array:
    """``clip(r, -clip, clip)``; ``clip=None`` returns ``r`` unchanged."""
    if clip is None:
        return rewards
    if clip <= 0:
        raise ValueError(f"clip_rewards: clip must be > 0 or None, got {clip}")
    return jnp.clip(rewards, -clip, clip)


def seeded_reward_stats(mean: float, std: float, *, count: float = 1.0) -> RunningStats:
    """Running statistics as if ``count`` rewards with this ``mean`` and population ``std`` had been seen.

    ``count`` sets how strongly the seed resists new batches (the merge weights it against each batch's
    size); ``std`` is the reward model's ``reward_stats["std"]``.
    """
    if std < 0 or count <= 0:
        raise ValueError(f"seeded_reward_stats: need std >= 0 and count > 0, got std={std}, count={count}")
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    return RunningStats(count=f32(count), mean=f32(mean), m2=f32(std * std * count))
