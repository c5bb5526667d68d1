"""LM head + cross-entropy / log-probs in sequence chunks: the ``[B, T, V]`` float32 logits never exist.

Hidden ``h [B, T, E]`` (``models.lm_head_operands``), kernel ``W [E, V]``, optional bias ``b [V]``, targets
``y [B, T]``, an optional mask ``m [B, T]`` of the positions that matter. The sequence is cut into ``k``
chunks of ``C`` positions (``B * C ~ chunk_size`` tokens; the batch axis stays whole, so a batch-sharded ``h``
needs no resharding) and a loop runs over them::

    z_c   = (h_c @ W + b) / temperature               [B, C, V] (one chunk at a time)
    lse_c = logsumexp(z_c);  p_c = exp(z_c - lse_c)
    logp  = z_c[y] - lse_c;  H = -sum_v p_c log p_c

**Only the masked positions are computed.** Each row's masked positions are moved to its front (a stable
per-row permutation, undone on the way out), and the loop runs over the first ``ceil(max_b n_b / C)``
chunks only, ``n_b`` = masked positions of row ``b`` (a dynamic trip count): an SFT batch with the loss on
the completions, or a DPO pair's completion tokens, pays the LM head for those and not for the prompts. The
last of those chunks runs in windows of ``C / 4`` positions, only as many as the longest row needs (packed
rows of ~1,000 loss tokens each, C = 256: 4 chunks + one 64-wide window instead of 5 chunks).

``z`` is produced by the matmul in ``logits_dtype`` (default float32; the stages pass their compute dtype,
bf16, as the PyTorch stacks' autocast LM head does) and every reduction runs in float32. Per chunk of the SFT
loss: one (max, argmax, logsumexp) pass (an online logsumexp in one variadic reduction,
:func:`_max_argmax_lse`), the target logit by a gather, and (with gradients) one pass that writes ``dz``;
the log-probs: a max pass and a sum-of-exp pass.

Gradients (custom VJPs), with ``onehot = (v == y)`` and ``a`` the label smoothing, ``zc`` the z-loss weight::

    d logp / dz = onehot - p;   d H / dz = -p * (log p + H)
    d [(1-a) (lse - z_y) + a (lse - mean z) + zc lse^2] / dz = p (1 + 2 zc lse) - (1-a) onehot - a / V

``dz`` is rounded to the compute dtype before the two gradient matmuls (``dh = dz W^T``, ``dW = h^T dz``,
the latter accumulated in f32 over chunks), as ``models.layers.einsum_f32_out`` does for the plain head.
:func:`chunked_sft_loss` computes its gradients during the forward pass (one logits matmul per chunk instead
of two; the backward only scales them by the incoming cotangent: those of the mean loss, so a step that
differentiates the mean scales by a literal 1 and pays no pass over ``dW``);
:func:`chunked_token_logprobs` recomputes each chunk's logits in the backward pass. Neither computes ``dW``
(or ``dh``) when that input is not being differentiated (LoRA: frozen heads cost no weight-gradient matmul).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

DEFAULT_CHUNK_TOKENS = 2048


def _layout(shape: tuple[int, ...], chunk_size: int) -> tuple[int, int]:
    """``(k, C)``: ``k`` chunks of ``C`` positions cover ``T`` (``B * C ~ chunk_size`` tokens)."""
    b, t = shape[:2]
    k = -(-t // max(1, chunk_size // max(b, 1)))
    return k, -(-t // k)


class _Chunks:
    """The chunk layout of ``[B, T, ...]`` arrays: padded to ``k * C`` positions and, with a mask, each row's
    masked positions first (``perm``: compacted -> original position, ``dest``: original -> compacted).
    ``n``: chunks to run (``k``, or the traced ``ceil(max_b n_b / C)`` with a mask); ``longest``: positions
    of the longest row (``T``, or the traced ``max_b n_b``); ``sub``: the window of the last chunk."""

    def __init__(self, shape: tuple[int, ...], chunk_size: int, mask: jax.Array | None):
        self.t = shape[1]
        self.k, self.c = _layout(shape, chunk_size)
        self.sub = self.c // 4 if self.c % 4 == 0 else self.c
        kc = self.k * self.c
        self.perm = self.dest = None
        self.n: Any = self.k
        self.longest: Any = self.t
        if mask is not None:
            m = mask > 0
            mp = jnp.pad(m, ((0, 0), (0, kc - self.t)))
            iota = jax.lax.broadcasted_iota(jnp.int32, mp.shape, 1)
            self.perm = jnp.argsort(jnp.where(mp, iota, iota + kc), axis=1)  # masked first, in order
            count = jnp.sum(m, axis=1, dtype=jnp.int32)
            self.dest = jnp.where(
                m,
                jnp.cumsum(m, axis=1, dtype=jnp.int32) - 1,
                count[:, None] + jnp.cumsum(~m, axis=1, dtype=jnp.int32) - 1,
            )
            self.longest = jnp.max(count)
            self.n = (self.longest + self.c - 1) // self.c

    def take(self, x: jax.Array) -> jax.Array:
        """``[B, T, ...] -> [B, k C, ...]`` in chunk order."""
        pad = self.k * self.c - self.t
        if pad:
            x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        if self.perm is None:
            return x
        return jnp.take_along_axis(x, self.perm.reshape(self.perm.shape + (1,) * (x.ndim - 2)), axis=1)

    def back(self, x: jax.Array) -> jax.Array:
        """``[B, k C, ...] -> [B, T, ...]`` (inverse of :meth:`take`)."""
        if self.dest is None:
            return x[:, : self.t]
        return jnp.take_along_axis(x, self.dest.reshape(self.dest.shape + (1,) * (x.ndim - 2)), axis=1)

    def chunk(self, x: jax.Array, w: tuple[Any, int]) -> jax.Array:
        """The window ``w = (start, size)`` of ``x [B, k C, ...]``: ``[B, size, ...]``."""
        return jax.lax.dynamic_slice_in_dim(x, w[0], w[1], axis=1)

    def put(self, buf: jax.Array, x: jax.Array, w: tuple[Any, int]) -> jax.Array:
        return jax.lax.dynamic_update_slice_in_dim(buf, x.astype(buf.dtype), w[0], axis=1)

    def loop(self, body, init, peel: bool = False):
        """``body(window, carry) -> carry`` over windows covering positions ``[0, longest)``: every chunk but
        the last as one window of C positions, the last in windows of ``sub = C / 4`` up to the longest row's
        end. A last chunk the rows barely enter (the common case: rows of similar length just past a multiple
        of C) costs a quarter of a chunk per window it needs instead of a whole one.

        ``peel``: the first chunk runs before the loops, always (its positions past a row's end are masked
        by the caller's body), so ``init`` may hold None accumulators that the body's first call turns into
        arrays: a weight gradient then starts as the first chunk's product instead of a zero-filled
        ``[V, E]`` f32 buffer that every chunk's matmul adds into (one write and one read of it saved)."""
        c, s = self.c, self.sub
        static = isinstance(self.n, int)
        lo = 0
        if peel:
            init, lo = body((0, c), init), 1
        if s == c:
            return jax.lax.fori_loop(
                lo, self.n if static else jnp.maximum(self.n, lo), lambda i, a: body((i * c, c), a), init
            )
        full = max(self.n - 1, lo) if static else jnp.maximum(self.n - 1, lo)
        carry = jax.lax.fori_loop(lo, full, lambda i, a: body((i * c, c), a), init)
        tail = (self.longest - full * c + s - 1) // s
        tail = max(tail, 0) if isinstance(tail, int) else jnp.maximum(tail, 0)
        return jax.lax.fori_loop(0, tail, lambda j, a: body((full * c + j * s, s), a), carry)


class _Head(NamedTuple):
    """Static settings of the head matmuls: what the logits matmul writes, and the kernel's layout
    (``vocab_major``: ``W [V, E]``, e.g. a tied embedding used as it is stored; else ``[E, V]``)."""

    dtype: Any
    vocab_major: bool


def _z(h, w, bias, inv_temp, head: _Head):
    """The chunk's logits ``[B, C, V]`` in float32, from a matmul that writes ``head.dtype``."""
    eq = "bce,ve->bcv" if head.vocab_major else "bce,ev->bcv"
    z = jnp.einsum(eq, h, w, preferred_element_type=head.dtype).astype(jnp.float32)
    if bias is not None:
        z = z + bias.astype(jnp.float32)
    return z * inv_temp if inv_temp != 1.0 else z


def _lse(z: jax.Array, zmax: jax.Array) -> jax.Array:
    return zmax + jnp.log(jnp.sum(jnp.exp(z - zmax[..., None]), axis=-1))


def _max_argmax_lse(z: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(max, argmax, logsumexp)`` over the last axis in ONE variadic reduction (one read of the chunk's
    logits instead of a (max, argmax) pass and a sum-of-exp pass).

    Each element enters as ``(z_v, v, 1)``; two partial results ``(m_a, i_a, s_a)``, ``(m_b, i_b, s_b)`` with
    ``s = sum exp(z - m)`` over their elements combine to ``M = max(m_a, m_b)`` (argmax: the first index on
    ties, as jnp.argmax) and ``s = s_hi + s_lo exp(m_lo - M)`` (hi: the side holding M; one exp per
    combination; ``exp(-inf) = 0`` when both sides are still empty). ``lse = M + log s``."""
    idx = jax.lax.broadcasted_iota(jnp.int32, z.shape, z.ndim - 1)

    def pick(a, b):
        (av, ai, as_), (bv, bi, bs) = a, b
        take_b = (bv > av) | ((bv == av) & (bi < ai))
        hi, lo = jnp.maximum(av, bv), jnp.minimum(av, bv)
        hi_s, lo_s = jnp.where(bv > av, bs, as_), jnp.where(bv > av, as_, bs)
        scale = jnp.exp(jnp.where(hi == -jnp.inf, -jnp.inf, lo - hi))
        return jnp.where(take_b, bv, av), jnp.where(take_b, bi, ai), hi_s + lo_s * scale

    init = (jnp.array(-jnp.inf, z.dtype), jnp.array(0, jnp.int32), jnp.array(0.0, z.dtype))
    zmax, best, total = jax.lax.reduce((z, idx, jnp.ones_like(z)), init, pick, (z.ndim - 1,))
    return zmax, best, zmax + jnp.log(total)


def _picked(z: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.take_along_axis(z, y[..., None].astype(jnp.int32), axis=-1, mode="clip")[..., 0]


def _onehot(z, y):
    return jax.lax.broadcasted_iota(jnp.int32, z.shape, 2) == y[..., None].astype(jnp.int32)


def _grads(dz, h, w, bias, need_h, need_w, head: _Head):
    """``(dh_c, dW_c f32, db_c f32)`` of one chunk from ``dz [B, C, V]`` (rounded to the compute dtype);
    ``dW`` in the kernel's own layout."""
    dz = dz.astype(h.dtype)
    vm = head.vocab_major
    dh = jnp.einsum("bcv,ve->bce" if vm else "bcv,ev->bce", dz, w).astype(h.dtype) if need_h else None
    if need_w:
        dw = jnp.einsum("bcv,bce->ve" if vm else "bce,bcv->ev", *((dz, h) if vm else (h, dz)),
                        preferred_element_type=jnp.float32)  # fmt: skip
    else:
        dw = None
    db = jnp.sum(dz.astype(jnp.float32), axis=(0, 1)) if need_w and bias is not None else None
    return dh, dw, db


def _add(acc, new):
    """``acc + new`` leafwise; a None ``new`` leaves ``acc``, a None ``acc`` (a peeled first chunk) takes
    ``new``."""
    return tuple(a if d is None else (d if a is None else a + d) for a, d in zip(acc, new, strict=True))


def next_token_targets(ids: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(targets, mask)`` ``[B, T]`` for a decoder's hidden states ``[B, T, E]``: position t predicts token
    t + 1 (``ids`` and ``loss_mask`` shifted left), the last position predicts nothing (target 0, mask 0)."""

    def shift(x):
        return jnp.concatenate([x[:, 1:], jnp.zeros_like(x[:, :1])], axis=1)

    return shift(ids), shift(loss_mask)


def _check(hidden, kernel, targets, name, vocab_major=False):
    e = kernel.shape[1 if vocab_major else 0] if kernel.ndim == 2 else None
    if hidden.ndim != 3 or kernel.ndim != 2 or hidden.shape[-1] != e:
        want = "[V, E]" if vocab_major else "[E, V]"
        raise ValueError(f"{name}: hidden [B, T, E] {hidden.shape} and kernel {want} {kernel.shape} disagree")
    if targets.shape != hidden.shape[:2]:
        raise ValueError(f"{name}: targets {targets.shape} should be hidden's [B, T] {hidden.shape[:2]}")


# ------------------------------------------------------------------------------------------------- log-probs


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _logprobs(h, w, bias, y, mask, inv_temp, chunk, entropy, zdt):
    return _logprobs_pass(h, w, bias, y, mask, inv_temp, chunk, entropy, zdt)[0]


def _logprobs_pass(h, w, bias, y, mask, inv_temp, chunk, entropy, zdt):
    """``((logp, ent) [B, T], (lse, ent) [B, k C] in chunk order)``; zero where ``mask`` is 0."""
    ch = _Chunks(h.shape, chunk, mask)
    hs, ys = ch.take(h), ch.take(y)
    ms = ch.take(mask > 0) if mask is not None else None
    b, kc = ys.shape
    zero = jnp.zeros((b, kc), jnp.float32)

    def body(i, bufs):  # i: the window (start, size)
        hc, yc = ch.chunk(hs, i), ch.chunk(ys, i)
        z = _z(hc, w, bias, inv_temp, zdt)
        lse = _lse(z, jnp.max(z, axis=-1))
        logp = _picked(z, yc) - lse
        if entropy:  # -sum p log p (as losses.token_entropy; lse - sum p z cancels at low entropy)
            lp = z - lse[..., None]
            ent = -jnp.sum(jnp.exp(lp) * lp, axis=-1)
        else:
            ent = jnp.zeros_like(lse)
        if ms is not None:
            on = ch.chunk(ms, i)
            logp, ent, lse = (jnp.where(on, x, 0.0) for x in (logp, ent, lse))
        return tuple(ch.put(buf, x, i) for buf, x in zip(bufs, (logp, ent, lse), strict=True))

    logp, ent, lse = ch.loop(body, (zero, zero, zero))
    return (ch.back(logp), ch.back(ent)), (lse, ent)


def _logprobs_fwd(h, w, bias, y, mask, inv_temp, chunk, entropy, zdt):
    b = bias.value if bias is not None else None
    m = mask.value if mask is not None else None
    out, (lse, ent) = _logprobs_pass(h.value, w.value, b, y.value, m, inv_temp, chunk, entropy, zdt)
    flags = (h.perturbed, w.perturbed or (bias is not None and bias.perturbed))
    res = (h.value, w.value, b, y.value, m, lse, ent)
    return out, (res, tuple(() if f else None for f in flags))


def _logprobs_bwd(inv_temp, chunk, entropy, zdt, saved, g):
    (h, w, bias, y, mask, lse, ent), (fh, fw) = saved
    need_h, need_w = fh is not None, fw is not None
    g_lp, g_ent = (None if isinstance(x, SymbolicZero) else x for x in g)
    ch = _Chunks(h.shape, chunk, mask)
    zero = jnp.zeros(h.shape[:2], jnp.float32)
    g_lp = zero if g_lp is None else g_lp
    g_ent = zero if g_ent is None or not entropy else g_ent
    if mask is not None:  # the outputs are constant (0) where the mask is 0: no gradient there
        g_lp, g_ent = (jnp.where(mask > 0, x, 0.0) for x in (g_lp, g_ent))
    hs, ys, gls, ges = (ch.take(a) for a in (h, y, g_lp, g_ent))

    def body(i, carry):
        acc, dhs = carry
        hc, yc, lc, ec = ch.chunk(hs, i), ch.chunk(ys, i), ch.chunk(lse, i), ch.chunk(ent, i)
        gl, ge = ch.chunk(gls, i), ch.chunk(ges, i)
        z = _z(hc, w, bias, inv_temp, zdt)
        p = jnp.exp(z - lc[..., None])
        dz = gl[..., None] * (_onehot(z, yc) - p)
        if entropy:
            dz = dz - ge[..., None] * p * (z - lc[..., None] + ec[..., None])
        dh, dw, db = _grads(dz * inv_temp, hc, w, bias, need_h, need_w, zdt)
        return _add(acc, (dw, db)), (ch.put(dhs, dh, i) if need_h else dhs)

    dhs0 = jnp.zeros(hs.shape, h.dtype) if need_h else None
    # the weight gradients start as the first chunk's (Chunks.loop peel), not as zeros
    (dw, db), dhs = ch.loop(body, ((None, None), dhs0), peel=need_w)
    return (
        ch.back(dhs) if need_h else None,
        None if dw is None else dw.astype(w.dtype),
        None if db is None else db.astype(bias.dtype),
        None,
        None,
    )


_logprobs.defvjp(_logprobs_fwd, _logprobs_bwd, symbolic_zeros=True)


def chunked_token_logprobs(
    hidden: jax.Array,
    kernel: jax.Array,
    targets: jax.Array,
    *,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_TOKENS,
    return_entropy: bool = False,
    logits_dtype: Any = None,
    vocab_major: bool = False,
):
    """``log softmax((hidden @ kernel + bias) / temperature)[targets]`` ``[B, T]`` f32, chunk by chunk.

    Equals ``token_logprobs(h @ W + b, targets, temperature=...)`` (and ``token_entropy`` of the same logits
    with ``return_entropy=True``: returns ``(logp, entropy)``); differentiable in ``hidden``, ``kernel`` and
    ``bias``. ``mask [B, T]``: only the positions where it is nonzero are computed; the others are 0 (with no
    gradient). ``logits_dtype``: what the logits matmul writes (None: f32; reductions are f32 either way).
    ``vocab_major``: ``kernel`` is ``[V, E]`` (logits ``hidden @ kernel.T``: a tied embedding as stored, with
    no transposed copy and its gradient in the same layout). Peak extra memory: one chunk's ``[B, C, V]``
    logits instead of ``[B, T, V]``.
    """
    _check(hidden, kernel, targets, "chunked_token_logprobs", vocab_major)
    if mask is not None and mask.shape != targets.shape:
        raise ValueError(f"chunked_token_logprobs: mask {mask.shape} != targets {targets.shape}")
    if mask is not None:
        mask = jax.lax.stop_gradient(mask)
    logp, ent = _logprobs(
        hidden, kernel, bias, targets, mask, 1.0 / float(temperature), int(chunk_size), bool(return_entropy),
        _Head(jnp.dtype(logits_dtype or jnp.float32), bool(vocab_major)),
    )  # fmt: skip
    return (logp, ent) if return_entropy else logp


# ---------------------------------------------------------------------------------------------- SFT loss


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _sft_sums(h, w, bias, y, m, smoothing, z_coef, chunk, zdt):
    return _sft_pass(h, w, bias, y, m, smoothing, z_coef, chunk, zdt, False, False)[0]


def _sft_pass(h, w, bias, y, m, smoothing, z_coef, chunk, zdt, need_h, need_w):
    """``(mean loss, nll sum, lse^2 sum, correct sum)`` over the masked tokens, and the mean loss's
    gradients when asked (``dz`` scaled by ``1 / max(count, 1)`` in the pass that writes it, so the caller
    differentiating the mean gets them with no extra pass over ``dW``)."""
    ch = _Chunks(h.shape, chunk, m)
    hs, ys, ms = ch.take(h), ch.take(y), ch.take(m)
    vocab = w.shape[0 if zdt.vocab_major else 1]
    inv_count = 1.0 / jnp.maximum(jnp.sum(m), 1.0)

    def body(i, carry):
        sums, grads, dhs = carry
        hc, yc, on = ch.chunk(hs, i), ch.chunk(ys, i), ch.chunk(ms, i) > 0
        z = _z(hc, w, bias, 1.0, zdt)
        _, best, lse = _max_argmax_lse(z)
        nll = lse - _picked(z, yc)
        per = nll
        if smoothing:
            per = (1.0 - smoothing) * nll + smoothing * (lse - jnp.mean(z, axis=-1))
        if z_coef:
            per = per + z_coef * jnp.square(lse)
        correct = (best == yc).astype(jnp.float32)
        new = tuple(jnp.sum(jnp.where(on, x, 0.0)) for x in (per, nll, jnp.square(lse), correct))
        if need_h or need_w:
            p = jnp.exp(z - lse[..., None])
            dz = p * (1.0 + 2.0 * z_coef * lse)[..., None] - (1.0 - smoothing) * _onehot(z, yc)
            dz = jnp.where(on[..., None], (dz - smoothing / vocab) * inv_count, 0.0)
            dh, dw, db = _grads(dz, hc, w, bias, need_h, need_w, zdt)
            grads = _add(grads, (dw, db))
            dhs = ch.put(dhs, dh, i) if need_h else dhs
        return tuple(a + s for a, s in zip(sums, new, strict=True)), grads, dhs

    zero = jnp.zeros((), jnp.float32)
    dhs0 = jnp.zeros(hs.shape, h.dtype) if need_h else None
    # the weight gradients start as the first chunk's (Chunks.loop peel), not as zeros
    (loss, *sums), (dw, db), dhs = ch.loop(body, ((zero,) * 4, (None, None), dhs0), peel=need_w)
    return (loss * inv_count, *sums), (ch.back(dhs) if need_h else None, dw, db)


def _sft_fwd(h, w, bias, y, m, smoothing, z_coef, chunk, zdt):
    need_h, need_w = h.perturbed, w.perturbed or (bias is not None and bias.perturbed)
    b = bias.value if bias is not None else None
    sums, grads = _sft_pass(
        h.value, w.value, b, y.value, m.value, smoothing, z_coef, chunk, zdt, need_h, need_w
    )
    dtypes = (jnp.zeros((0,), w.value.dtype), None if b is None else jnp.zeros((0,), b.dtype))  # markers
    return sums, (grads, dtypes)


def _sft_bwd(smoothing, z_coef, chunk, zdt, saved, g):
    (dh, dw, db), (w_like, b_like) = saved
    g = g[0]  # only the mean loss is differentiable (the metric sums are stop_gradient'ed by the caller);
    # a training step differentiating the mean itself passes the literal 1 here, which XLA folds away
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
    logits_dtype: Any = None,
    vocab_major: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``losses.sft_loss(hidden @ kernel + bias, targets, loss_mask, ...)`` without the ``[B, T, V]`` logits.

    Same ``(loss, metrics)`` (``loss_sum``, ``token_count``, ``nll``, ``accuracy``, ``z_loss``); the loss is
    differentiable in ``hidden``, ``kernel`` and ``bias`` (metrics and the mask are not). Gradients are
    computed in the forward pass, one chunk at a time, and scaled by the loss cotangent in the backward. Only
    the positions where ``loss_mask`` is nonzero go through the LM head. ``logits_dtype``: what the logits
    matmul writes (None: f32; the reductions are f32 either way). ``vocab_major``: ``kernel`` is ``[V, E]``
    (as :func:`chunked_token_logprobs`).
    """
    _check(hidden, kernel, targets, "chunked_sft_loss", vocab_major)
    if loss_mask.shape != targets.shape:
        raise ValueError(f"chunked_sft_loss: loss_mask {loss_mask.shape} != targets {targets.shape}")
    mask = jax.lax.stop_gradient(loss_mask.astype(jnp.float32))
    loss, nll, zsq, correct = _sft_sums(
        hidden, kernel, bias, targets, mask, float(label_smoothing), float(z_loss), int(chunk_size),
        _Head(jnp.dtype(logits_dtype or jnp.float32), bool(vocab_major)),
    )  # fmt: skip
    nll, zsq, correct = jax.lax.stop_gradient((nll, zsq, correct))
    count = jnp.sum(mask)
    denom = jnp.maximum(count, 1.0)
    metrics = {
        "loss_sum": loss * denom,  # differentiable (PPO-ptx sums it over micro-batches)
        "token_count": count,
        "nll": nll / denom,
        "accuracy": correct / denom,
        "z_loss": zsq / denom,
    }
    return loss, metrics
