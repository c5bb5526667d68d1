"""Supervised fine-tuning loss and per-token log-probabilities.

For logits ``z`` [B, T, V], targets ``y`` [B, T] (``y[b, t]`` is the token that ``z[b, t]`` predicts, i.e. the
caller has already shifted) and a loss mask ``m`` [B, T]:

    lse_{bt}  = log sum_v exp(z_{btv})
    q_{btv}   = (1 - alpha) * onehot(y_{bt})_v + alpha / V            (label smoothing alpha)
    ce_{bt}   = lse_{bt} - sum_v q_{btv} z_{btv}
    l_{bt}    = ce_{bt} + z_coef * lse_{bt}^2                          (PaLM z-loss)
    loss      = sum_{bt} m_{bt} l_{bt} / sum_{bt} m_{bt}

``loss_sum`` and ``token_count`` are returned as metrics so that gradient accumulation over micro-batches can
normalise by the total token count exactly: ``sum_i loss_sum_i / sum_i token_count_i``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_logprobs(logits: jax.Array, tokens: jax.Array, *, temperature: float = 1.0) -> jax.Array:
    """log p(tokens) under softmax(logits / temperature).

    logits: [..., V]; tokens: [...] int. Returns [...] float32:
    ``z[token] / T - logsumexp(z / T)`` (no [..., V] log-softmax is materialised besides the logsumexp).
    """
    z = logits.astype(jnp.float32)
    if temperature != 1.0:
        z = z / temperature
    picked = jnp.take_along_axis(z, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(z, axis=-1)


def sft_loss(
    logits: jax.Array,  # [B, T, V]
    targets: jax.Array,  # [B, T] int
    loss_mask: jax.Array,  # [B, T] {0, 1}
    *,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Token-mean cross entropy over the masked tokens (math in the module docstring).

    Returns ``(loss, metrics)`` with metrics ``loss_sum`` (masked sum of per-token losses), ``token_count``,
    ``nll`` (token-mean negative log-likelihood without smoothing or z-loss), ``accuracy`` (argmax == target)
    and ``z_loss`` (token-mean lse^2, unweighted).
    """
    if logits.shape[:-1] != targets.shape or targets.shape != loss_mask.shape:
        raise ValueError(
            f"sft_loss: logits {logits.shape}, targets {targets.shape} and loss_mask {loss_mask.shape} "
            "disagree"
        )
    z = logits.astype(jnp.float32)
    mask = loss_mask.astype(jnp.float32)
    lse = jax.nn.logsumexp(z, axis=-1)
    target_logit = jnp.take_along_axis(z, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    nll = lse - target_logit
    per_token = nll
    if label_smoothing:
        smooth = lse - jnp.mean(z, axis=-1)  # cross entropy against the uniform distribution
        per_token = (1.0 - label_smoothing) * nll + label_smoothing * smooth
    if z_loss:
        per_token = per_token + z_loss * jnp.square(lse)
    count = jnp.sum(mask)
    denom = jnp.maximum(count, 1.0)
    loss_sum = jnp.sum(jnp.where(mask > 0, per_token, 0.0))
    correct = (jnp.argmax(z, axis=-1) == targets).astype(jnp.float32)
    metrics = {
        "loss_sum": loss_sum,
        "token_count": count,
        "nll": jnp.sum(jnp.where(mask > 0, nll, 0.0)) / denom,
        "accuracy": jnp.sum(correct * mask) / denom,
        "z_loss": jnp.sum(jnp.where(mask > 0, jnp.square(lse), 0.0)) / denom,
    }
    return loss_sum / denom, metrics
