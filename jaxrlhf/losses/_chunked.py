"""LM head + cross-entropy / log-probs in sequence chunks: the ``[B, T, V]`` float32 logits never exist.

Hidden ``h [B, T, E]`` (``models.lm_head_operands``), kernel ``W [E, V]``, optional bias ``b [V]``, targets
``y [B, T]``. The sequence is cut into ``k`` chunks of ``C`` positions (``B * C ~ chunk_size`` tokens; the
batch axis stays whole, so a batch-sharded ``h`` needs no resharding) and a ``lax.scan`` runs over them::

    z_c   = (h_c @ W + b) / temperature               [B, C, V] f32 (one chunk at a time)
    lse_c = logsumexp(z_c);  p_c = exp(z_c - lse_c)
    logp  = z_c[y] - lse_c;  H = -sum_v p_c log p_c

Gradients (custom VJPs), with ``onehot = (v == y)`` and ``a`` the label smoothing, ``zc`` the z-loss weight::

    d logp / dz = onehot - p;   d H / dz = -p * (log p + H)
    d [(1-a) (lse - z_y) + a (lse - mean z) + zc lse^2] / dz = p (1 + 2 zc lse) - (1-a) onehot - a / V

``dz`` is rounded to the compute dtype before the two gradient matmuls (``dh = dz W^T``, ``dW = h^T dz``,
the latter accumulated in f32 over chunks), as ``models.layers.einsum_f32_out`` does for the plain head.
:func:`chunked_sft_loss` computes its gradients during the forward pass (one logits matmul per chunk instead
of two; the backward only scales them by the incoming cotangent); :func:`chunked_token_logprobs` recomputes
each chunk's logits in the backward pass. Neither computes ``dW`` (or ``dh``) when that input is not being
differentiated (LoRA: frozen heads cost no weight-gradient matmul).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

DEFAULT_CHUNK_TOKENS = 4096


def _split(x: jax.Array, k: int, c: int) -> jax.Array:
    """``[B, T, ...] -> [k, B, C, ...]`` (T zero-padded to ``k * C``)."""
    b, t = x.shape[:2]
    pad = k * c - t
    if pad:
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape((b, k, c) + x.shape[2:]), 1, 0)


def _join(x: jax.Array, t: int) -> jax.Array:
    """``[k, B, C, ...] -> [B, T, ...]`` (inverse of :func:`_split`)."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape((x.shape[0], -1) + x.shape[3:])[:, :t]


def _layout(shape: tuple[int, ...], chunk_size: int) -> tuple[int, int]:
    b, t = shape[:2]
    k = -(-t // max(1, chunk_size // max(b, 1)))
    return k, -(-t // k)


def _z(h, w, bias, inv_temp):
    z = jnp.einsum("bce,ev->bcv", h, w, preferred_element_type=jnp.float32)
    if bias is not None:
        z = z + bias.astype(jnp.float32)
    return z * inv_temp if inv_temp != 1.0 else z


def _onehot(z, y):
    return jax.lax.broadcasted_iota(jnp.int32, z.shape, 2) == y[..., None].astype(jnp.int32)


def _grads(dz, h, w, bias, need_h, need_w):
    """``(dh_c, dW_c f32, db_c f32)`` of one chunk from ``dz [B, C, V]`` (rounded to the compute dtype)."""
    dz = dz.astype(h.dtype)
    dh = jnp.einsum("bcv,ev->bce", dz, w).astype(h.dtype) if need_h else None
    dw = jnp.einsum("bce,bcv->ev", h, dz, preferred_element_type=jnp.float32) if need_w else None
    db = jnp.sum(dz.astype(jnp.float32), axis=(0, 1)) if need_w and bias is not None else None
    return dh, dw, db


def _check(hidden, kernel, targets, name):
    if hidden.ndim != 3 or kernel.ndim != 2 or hidden.shape[-1] != kernel.shape[0]:
        raise ValueError(f"{name}: hidden [B, T, E] {hidden.shape} and kernel [E, V] {kernel.shape} disagree")
    if targets.shape != hidden.shape[:2]:
        raise ValueError(f"{name}: targets {targets.shape} should be hidden's [B, T] {hidden.shape[:2]}")


# ------------------------------------------------------------------------------------------------- log-probs


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _logprobs(h, w, bias, y, inv_temp, chunk, entropy):
    k, c = _layout(h.shape, chunk)

    def body(_, xs):
        hc, yc = xs
        z = _z(hc, w, bias, inv_temp)
        lse = jax.nn.logsumexp(z, axis=-1)
        logp = jnp.sum(jnp.where(_onehot(z, yc), z, 0.0), axis=-1) - lse
        if entropy:  # -sum p log p (as losses.token_entropy; lse - sum p z cancels at low entropy)
            lp = z - lse[..., None]
            ent = -jnp.sum(jnp.exp(lp) * lp, axis=-1)
        else:
            ent = jnp.zeros_like(lse)
        return None, (logp, ent, lse)

    _, (logp, ent, lse) = jax.lax.scan(body, None, (_split(h, k, c), _split(y, k, c)))
    t = h.shape[1]
    return _join(logp, t), _join(ent, t), _join(lse, t)


def _logprobs_fwd(h, w, bias, y, inv_temp, chunk, entropy):
    out = _logprobs(
        h.value, w.value, bias.value if bias is not None else None, y.value, inv_temp, chunk, entropy
    )
    flags = (h.perturbed, w.perturbed or (bias is not None and bias.perturbed))
    res = (h.value, w.value, bias.value if bias is not None else None, y.value, out[1], out[2])
    return out, (res, tuple(() if f else None for f in flags))


def _logprobs_bwd(inv_temp, chunk, entropy, saved, g):
    (h, w, bias, y, ent, lse), (fh, fw) = saved
    need_h, need_w = fh is not None, fw is not None
    g_lp, g_ent = (None if isinstance(x, SymbolicZero) else x for x in g[:2])
    k, c = _layout(h.shape, chunk)
    zero = jnp.zeros(h.shape[:2], jnp.float32)
    g_lp = zero if g_lp is None else g_lp
    g_ent = zero if g_ent is None or not entropy else g_ent

    def body(acc, xs):
        hc, yc, lc, ec, gl, ge = xs
        z = _z(hc, w, bias, inv_temp)
        p = jnp.exp(z - lc[..., None])
        dz = gl[..., None] * (_onehot(z, yc) - p)
        if entropy:
            dz = dz - ge[..., None] * p * (z - lc[..., None] + ec[..., None])
        dh, dw, db = _grads(dz * inv_temp, hc, w, bias, need_h, need_w)
        acc = tuple(a if d is None else a + d for a, d in zip(acc, (dw, db), strict=True))
        return acc, dh

    acc0 = (
        jnp.zeros(w.shape, jnp.float32) if need_w else None,
        jnp.zeros(bias.shape, jnp.float32) if need_w and bias is not None else None,
    )
    xs = tuple(_split(a, k, c) for a in (h, y, lse, ent, g_lp, g_ent))
    (dw, db), dh = jax.lax.scan(body, acc0, xs)
    dh = _join(dh, h.shape[1]) if need_h else None
    return (
        dh,
        None if dw is None else dw.astype(w.dtype),
        None if db is None else db.astype(bias.dtype),
        None,
    )


_logprobs.defvjp(_logprobs_fwd, _logprobs_bwd, symbolic_zeros=True)


def chunked_token_logprobs(
    hidden: jax.Array,
    kernel: jax.Array,
    targets: jax.Array,
    *,
    bias: jax.Array | None = None,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_TOKENS,
    return_entropy: bool = False,
):
    """``log softmax((hidden @ kernel + bias) / temperature)[targets]`` ``[B, T]`` f32, chunk by chunk.

    Equals ``token_logprobs(h @ W + b, targets, temperature=...)`` (and ``token_entropy`` of the same logits
    with ``return_entropy=True``: returns ``(logp, entropy)``); differentiable in ``hidden``, ``kernel`` and
    ``bias``. Peak extra memory: one chunk's ``[B, C, V]`` f32 logits instead of ``[B, T, V]``.
    """
    _check(hidden, kernel, targets, "chunked_token_logprobs")
    logp, ent, _ = _logprobs(
        hidden, kernel, bias, targets, 1.0 / float(temperature), chunk_size, return_entropy
    )
    return (logp, ent) if return_entropy else logp


# ---------------------------------------------------------------------------------------------- SFT loss


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _sft_sums(h, w, bias, y, m, smoothing, z_coef, chunk):
    return _sft_pass(h, w, bias, y, m, smoothing, z_coef, chunk, False, False)[0]


def _sft_pass(h, w, bias, y, m, smoothing, z_coef, chunk, need_h, need_w):
    """Sums ``(loss, nll, lse^2, correct)`` over masked tokens, and their loss gradients when asked."""
    k, c = _layout(h.shape, chunk)
    vocab = w.shape[1]

    def body(acc, xs):
        hc, yc, mc = xs
        z = _z(hc, w, bias, 1.0)
        lse = jax.nn.logsumexp(z, axis=-1)
        hot = _onehot(z, yc)
        nll = lse - jnp.sum(jnp.where(hot, z, 0.0), axis=-1)
        per = nll
        if smoothing:
            per = (1.0 - smoothing) * nll + smoothing * (lse - jnp.mean(z, axis=-1))
        if z_coef:
            per = per + z_coef * jnp.square(lse)
        on = mc > 0
        correct = jnp.argmax(z, axis=-1) == yc
        sums = tuple(
            jnp.sum(jnp.where(on, x, 0.0)) for x in (per, nll, jnp.square(lse), correct.astype(jnp.float32))
        )
        dh = None
        grads = acc[1]
        if need_h or need_w:
            p = jnp.exp(z - lse[..., None])
            dz = p * (1.0 + 2.0 * z_coef * lse)[..., None] - (1.0 - smoothing) * hot - smoothing / vocab
            dz = jnp.where(on[..., None], dz, 0.0)
            dh, dw, db = _grads(dz, hc, w, bias, need_h, need_w)
            grads = tuple(a if d is None else a + d for a, d in zip(grads, (dw, db), strict=True))
        return (tuple(a + s for a, s in zip(acc[0], sums, strict=True)), grads), dh

    zero = jnp.zeros((), jnp.float32)
    g0 = (
        jnp.zeros(w.shape, jnp.float32) if need_w else None,
        jnp.zeros(bias.shape, jnp.float32) if need_w and bias is not None else None,
    )
    (sums, (dw, db)), dh = jax.lax.scan(body, ((zero,) * 4, g0), tuple(_split(a, k, c) for a in (h, y, m)))
    return sums, (_join(dh, h.shape[1]) if need_h else None, dw, db)


def _sft_fwd(h, w, bias, y, m, smoothing, z_coef, chunk):
    need_h, need_w = h.perturbed, w.perturbed or (bias is not None and bias.perturbed)
    b = bias.value if bias is not None else None
    sums, grads = _sft_pass(h.value, w.value, b, y.value, m.value, smoothing, z_coef, chunk, need_h, need_w)
    dtypes = (jnp.zeros((0,), w.value.dtype), None if b is None else jnp.zeros((0,), b.dtype))  # markers
    return sums, (grads, dtypes)


def _sft_bwd(smoothing, z_coef, chunk, saved, g):
    (dh, dw, db), (w_like, b_like) = saved
    g = g[0]  # only the loss sum is differentiable (the metric sums are stop_gradient'ed by the caller)
    g = jnp.zeros((), jnp.float32) if isinstance(g, SymbolicZero) else g
    return (
        None if dh is None else (dh * g.astype(dh.dtype)),
        None if dw is None else (dw * g).astype(w_like.dtype),
        None if db is None else (db * g).astype(b_like.dtype),
        None,
        None,
    )


_sft_sums.defvjp(_sft_fwd, _sft_bwd, symbolic_zeros=True)


def chunked_sft_loss(
    hidden: jax.Array,  # [B, T, E]
    kernel: jax.Array,  # [E, V]
    targets: jax.Array,  # [B, T] int
    loss_mask: jax.Array,  # [B, T]
    *,
    bias: jax.Array | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    chunk_size: int = DEFAULT_CHUNK_TOKENS,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``losses.sft_loss(hidden @ kernel + bias, targets, loss_mask, ...)`` without the ``[B, T, V]`` logits.

    Same ``(loss, metrics)`` (``loss_sum``, ``token_count``, ``nll``, ``accuracy``, ``z_loss``); the loss is
    differentiable in ``hidden``, ``kernel`` and ``bias`` (metrics and the mask are not). Gradients are
    computed in the forward pass, one chunk at a time, and scaled by the loss cotangent in the backward.
    """
    _check(hidden, kernel, targets, "chunked_sft_loss")
    if loss_mask.shape != targets.shape:
        raise ValueError(f"chunked_sft_loss: loss_mask {loss_mask.shape} != targets {targets.shape}")
    mask = jax.lax.stop_gradient(loss_mask.astype(jnp.float32))
    loss_sum, nll, zsq, correct = _sft_sums(
        hidden, kernel, bias, targets, mask, float(label_smoothing), float(z_loss), chunk_size
    )
    nll, zsq, correct = jax.lax.stop_gradient((nll, zsq, correct))
    count = jnp.sum(mask)
    denom = jnp.maximum(count, 1.0)
    metrics = {
        "loss_sum": loss_sum,
        "token_count": count,
        "nll": nll / denom,
        "accuracy": correct / denom,
        "z_loss": zsq / denom,
    }
    return loss_sum / denom, metrics
