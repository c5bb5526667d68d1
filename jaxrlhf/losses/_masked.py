"""Masked reductions shared by the RL losses (PPO, GRPO, KL penalties).

With a mask ``m`` (1 = real token, 0 = padding) and ``n = sum(m)``:

    masked_mean(x, m)   = sum(x * m) / max(n, 1)
    masked_var(x, m)    = masked_mean((x - masked_mean(x, m))^2, m) * (n / (n - 1) if unbiased)
    masked_whiten(x, m) = (x - mu) / sqrt(var + eps)  (+ mu again when ``shift_mean=False``)

Positions outside the mask are returned as they are computed (callers multiply by the mask where it matters);
``masked_whiten`` sets them to zero so padded advantages can never leak into a loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def masked_sum(x: jax.Array, mask: jax.Array, axis: int | tuple[int, ...] | None = None) -> jax.Array:
    """``sum(x * mask)`` over ``axis`` (all axes when None); ``where`` keeps NaNs at padding out."""
    return jnp.sum(jnp.where(mask > 0, x, 0.0), axis=axis)


def masked_mean(x: jax.Array, mask: jax.Array, axis: int | tuple[int, ...] | None = None) -> jax.Array:
    """Mean of ``x`` over the positions where ``mask`` is nonzero; 0 where the mask is empty."""
    mask = mask.astype(jnp.float32)
    return masked_sum(x, mask, axis) / jnp.maximum(jnp.sum(mask, axis=axis), 1.0)


def masked_var(x: jax.Array, mask: jax.Array, *, unbiased: bool = True) -> jax.Array:
    """Variance of the masked entries of ``x`` (over all axes); Bessel-corrected when ``unbiased``."""
    mask = mask.astype(jnp.float32)
    mean = masked_mean(x, mask)
    var = masked_mean(jnp.square(x - mean), mask)
    if unbiased:
        n = jnp.sum(mask)
        var = var * n / jnp.maximum(n - 1.0, 1.0)
    return var


def masked_whiten(x: jax.Array, mask: jax.Array, *, shift_mean: bool = True, eps: float = 1e-8) -> jax.Array:
    """Normalise the masked entries of ``x`` to zero mean and unit variance (over all axes).

    ``shift_mean=False`` only rescales (keeps the mean), as TRL does for rewards. Padding comes back as 0.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    whitened = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return jnp.where(mask > 0, whitened, 0.0)
