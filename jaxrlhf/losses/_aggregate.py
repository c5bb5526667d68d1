"""Aggregation of per-token losses into one scalar, exact under gradient accumulation.

For per-token losses ``l`` [B, T] and a mask ``m`` [B, T]:

    "token_mean":  sum_bt m l / D_tok        D_tok = sum_bt m          (default; TRL, DeepSpeed-Chat)
    "seq_mean":    sum_b [ sum_t m l / max(sum_t m, 1) ] / D_seq        D_seq = B

``denominator`` overrides ``D_tok`` / ``D_seq``: a micro-batch of a larger minibatch passes the minibatch's
token (or sequence) count, so the micro-batch losses *add up* to the minibatch loss and their gradients add
up to the minibatch gradient (no re-weighting afterwards).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LOSS_AGGREGATIONS = ("token_mean", "seq_mean")


def aggregate_loss(
    per_token: jax.Array,  # [B, T]
    mask: jax.Array,  # [B, T]
    *,
    loss_agg: str = "token_mean",
    denominator: jax.Array | float | None = None,
) -> jax.Array:
    """Scalar loss from per-token losses (module docstring); masked positions never contribute."""
    m = mask.astype(jnp.float32)
    masked = jnp.where(m > 0, per_token.astype(jnp.float32), 0.0)
    if loss_agg == "token_mean":
        denom = jnp.sum(m) if denominator is None else denominator
        return jnp.sum(masked) / jnp.maximum(denom, 1.0)
    if loss_agg == "seq_mean":
        per_seq = jnp.sum(masked, axis=-1) / jnp.maximum(jnp.sum(m, axis=-1), 1.0)
        denom = per_seq.shape[0] if denominator is None else denominator
        return jnp.sum(per_seq) / jnp.maximum(denom, 1.0)
    raise ValueError(f"aggregate_loss: unknown loss_agg {loss_agg!r}; choose one of {LOSS_AGGREGATIONS}")
