"""Reward-model loss (Bradley-Terry) and a running reward normaliser.

Bradley-Terry with an optional per-pair margin ``mu`` (e.g. the Llama-2 preference-strength margin) and the
reward-centering term of TRL's RewardTrainer (``center_rewards_coefficient``, Eisenstein et al. 2023):

    d_i  = r_chosen_i - r_rejected_i
    loss = mean_i [ -log sigmoid(d_i - mu_i) ] + c * mean_i (r_chosen_i + r_rejected_i)^2

The running normaliser keeps the count, mean and sum of squared deviations of every reward seen so far
(Welford; batches are merged with Chan et al.'s parallel update), as an ``(init, update)`` pair like an optax
transformation, so its state can live inside a jitted PPO step and inside a checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp


def reward_loss(
    r_chosen: jax.Array,  # [B]
    r_rejected: jax.Array,  # [B]
    *,
    margin: jax.Array | None = None,  # [B]
    center_coef: float = 0.0,
    mask: jax.Array | None = None,  # [B] 1 = real pair, 0 = padding pair
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Bradley-Terry pairwise loss (module docstring); means run over the pairs where ``mask`` is 1.

    Metrics: ``accuracy`` (fraction with r_chosen > r_rejected), ``margin`` (mean d), ``reward_mean`` and
    ``reward_std`` over chosen and rejected together, ``chosen_mean``, ``rejected_mean``, ``bt_loss`` (the
    Bradley-Terry part alone).
    """
    if r_chosen.shape != r_rejected.shape or r_chosen.ndim != 1:
        raise ValueError(
            f"reward_loss: r_chosen {r_chosen.shape} and r_rejected {r_rejected.shape} must be [B]"
        )
    rc = r_chosen.astype(jnp.float32)
    rr = r_rejected.astype(jnp.float32)
    w = jnp.ones_like(rc) if mask is None else mask.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(w), 1.0)

    def mean(x):
        return jnp.sum(jnp.where(w > 0, x, 0.0)) / n

    d = rc - rr
    logits = d if margin is None else d - margin.astype(jnp.float32)
    bt = mean(-jax.nn.log_sigmoid(logits))
    loss = bt + center_coef * mean(jnp.square(rc + rr)) if center_coef else bt
    reward_mean = (mean(rc) + mean(rr)) / 2
    reward_var = (mean(jnp.square(rc - reward_mean)) + mean(jnp.square(rr - reward_mean))) / 2
    metrics = {
        "accuracy": mean((d > 0).astype(jnp.float32)),
        "margin": mean(d),
        "reward_mean": reward_mean,
        "reward_std": jnp.sqrt(reward_var),
        "chosen_mean": mean(rc),
        "rejected_mean": mean(rr),
        "bt_loss": bt,
    }
    return loss, metrics


# ---------------------------------------------------------------------------------------- running normaliser


class RunningStats(NamedTuple):
    """Welford state: ``count`` rewards seen, their ``mean`` and ``m2 = sum (r - mean)^2``."""

    count: jax.Array
    mean: jax.Array
    m2: jax.Array

    @property
    def var(self) -> jax.Array:
        """Population variance of everything seen (0 before the first update)."""
        return self.m2 / jnp.maximum(self.count, 1.0)

    @property
    def std(self) -> jax.Array:
        return jnp.sqrt(self.var)


class RewardNormalizer(NamedTuple):
    """``init() -> RunningStats``; ``update(state, rewards, mask=None) -> RunningStats``."""

    init: Callable[[], RunningStats]
    update: Callable[..., RunningStats]


def running_reward_normalizer() -> RewardNormalizer:
    """Running mean / variance of rewards, merged batch by batch (Chan et al. 1979).

    For the stored ``(n_a, mean_a, m2_a)`` and a batch with ``(n_b, mean_b, m2_b)``:

        n    = n_a + n_b,   delta = mean_b - mean_a
        mean = mean_a + delta * n_b / n
        m2   = m2_a + m2_b + delta^2 * n_a * n_b / n

    which equals the one-pass Welford recursion applied reward by reward, without a Python loop.
    """

    def init() -> RunningStats:
        zero = jnp.zeros((), jnp.float32)
        return RunningStats(count=zero, mean=zero, m2=zero)

    def update(state: RunningStats, rewards: jax.Array, mask: jax.Array | None = None) -> RunningStats:
        r = rewards.astype(jnp.float32).reshape(-1)
        w = jnp.ones_like(r) if mask is None else mask.astype(jnp.float32).reshape(-1)
        n_b = jnp.sum(w)
        mean_b = jnp.sum(w * r) / jnp.maximum(n_b, 1.0)
        m2_b = jnp.sum(w * jnp.square(r - mean_b))
        n = state.count + n_b
        delta = mean_b - state.mean
        safe_n = jnp.maximum(n, 1.0)
        return RunningStats(
            count=n,
            mean=state.mean + delta * n_b / safe_n,
            m2=state.m2 + m2_b + jnp.square(delta) * state.count * n_b / safe_n,
        )

    return RewardNormalizer(init=init, update=update)


def normalize_rewards(
    state: RunningStats, rewards: jax.Array, *, shift_mean: bool = True, eps: float = 1e-8
) -> jax.Array:
    """``(r - mean) / sqrt(var + eps)`` with the running statistics (only the scaling when not shift_mean)."""
    centered = rewards - state.mean if shift_mean else rewards
    return centered * jax.lax.rsqrt(state.var + eps)
