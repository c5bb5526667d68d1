"""One-token (decode) attention over a KV cache as one fused GPU kernel (Pallas, Triton backend).

Shapes: B rows, S cache slots, H query heads, K kv heads, G = H / K query heads per kv head, D head dim.

For every row b and kv head k the kernel reads that head's cache ``K[b, :, k], V[b, :, k]`` ([S, D] each,
in the cache's own ``[B, S, K, D]`` layout: no transpose of the cache) once, in blocks of ``block`` slots,
and keeps the flash-attention running state of its G query heads in registers:

    s_j = scale * q . k_j          (f32; masked slots get the plain path's finite -1e30 instead)
    m'  = max(m, max_j s_j)
    z'  = z e^{m - m'} + sum_j e^{s_j - m'}
    o'  = o e^{m - m'} + sum_j e^{s_j - m'} v_j
    out = o / z

which is ``softmax(s) @ V`` exactly as :func:`jaxrlhf.models.attention.attend`'s plain path computes it
(f32 scores and softmax, the value product from bf16 probabilities with f32 accumulation), up to where the
bf16 roundings fall; a row whose every slot is masked averages all S values, as the plain softmax over equal
-1e30 scores does. The plain path instead runs the scores, the softmax's max / sum / normalise and the value
product as separate kernels with the ``[B, H, S]`` scores in memory between them: on an H200 at batch 64 it
reached ~0.75 TB/s over the cache (benchmarks/RESULTS.md, 2026-12-03 decode profile).

The Triton ``dot`` needs at least 16 rows, so the G query heads of a kv head are padded with zeros to 16
(their outputs are dropped). Used by ``attend`` for ``impl="fused"`` when T == 1 on a GPU (bf16 / fp16, no
bias, a power-of-two head dim, S a multiple of 16); everything else keeps the existing paths.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

_NEG = -1e30  # = attention._NEG: masked scores, as the plain path writes them
_MIN_ROWS = 16  # the Triton dot's smallest M
DEFAULT_TUNING = (128, 4, 2)  # largest block of slots per loop step, num_warps, num_stages


def supported(q_shape: tuple, k_shape: tuple, dtype) -> bool:
    """Whether :func:`decode_attention` serves ``q [B, 1, H, D]`` over ``k [B, S, K, D]`` in ``dtype``."""
    b, t, h, d = q_shape
    s, kv = k_shape[1], k_shape[2]
    return (
        t == 1
        and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
        and d >= 16
        and d & (d - 1) == 0
        and d <= 256
        and h % kv == 0
        and h // kv <= _MIN_ROWS
        and s % 16 == 0
    )


def _block(s: int, most: int = 128) -> int:
    """The slots per loop step: the largest power of two <= ``most`` dividing S (S is a multiple of 16)."""
    block = most
    while s % block:
        block //= 2
    return block


def tuning() -> tuple[int, int, int]:
    """``(largest block, num_warps, num_stages)`` of the kernel: the defaults, or the benchmarks' sweep
    override ``JAXRLHF_DECODE_TUNING="block,warps,stages"`` (read at trace time)."""
    raw = os.environ.get("JAXRLHF_DECODE_TUNING")
    if not raw:
        return DEFAULT_TUNING
    try:
        block, warps, stages = (int(x) for x in raw.split(","))
    except ValueError:
        raise ValueError(f"JAXRLHF_DECODE_TUNING={raw!r}: want 'block,warps,stages', e.g. '64,4,2'") from None
    return block, warps, stages


def _dot(a: jax.Array, b: jax.Array, b_contract: int) -> jax.Array:
    """``a [M, C] . b`` over ``b``'s axis ``b_contract`` (1: ``a @ b.T``), f32 accumulation (Triton's dot)."""
    return jax.lax.dot_general(a, b, (((1,), (b_contract,)), ((), ())), preferred_element_type=jnp.float32)


def _kernel(q_ref, k_ref, v_ref, m_ref, o_ref, *, scale: float, block: int, steps: int):
    """One (row, kv head): q_ref [16, D], k_ref / v_ref [S, D], m_ref [S] int32 (1 = visible), o_ref
    [16, D]."""
    from jax.experimental import pallas as pl

    q = q_ref[...]
    rows, d = q.shape

    def body(i, carry):
        o, m, z = carry
        sl = pl.ds(i * block, block)
        k = k_ref[sl, :]
        s = _dot(q, k, 1) * scale  # [16, block]
        visible = m_ref[sl] != 0
        s = jnp.where(visible[None, :], s, jnp.float32(_NEG))
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.exp(s - m_new[:, None])
        alpha = jnp.exp(m - m_new)
        z = z * alpha + jnp.sum(p, axis=1)
        v = v_ref[sl, :]
        o = o * alpha[:, None] + _dot(p.astype(v.dtype), v, 0)
        return o, m_new, z

    init = (
        jnp.zeros((rows, d), jnp.float32),
        jnp.full((rows,), -jnp.inf, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )
    o, _, z = jax.lax.fori_loop(0, steps, body, init)
    o_ref[...] = (o / z[:, None]).astype(o_ref.dtype)


def decode_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    *,
    scale: float,
    interpret: bool = False,
    setting: tuple[int, int, int] | None = None,
) -> jax.Array:
    """Attention of one query token ``q [B, 1, H, D]`` over ``k, v [B, S, K, D]`` -> ``[B, 1, H, D]``.

    ``mask`` broadcasts to ``[B, 1, 1, S]`` (True = visible). ``interpret`` runs the kernel in Pallas'
    interpreter (CPU tests); ``setting``: ``(largest block, num_warps, num_stages)``, default
    :func:`tuning`."""
    return _decode_attention(q, k, v, mask, float(scale), bool(interpret), tuple(setting or tuning()))


@functools.partial(jax.jit, static_argnums=(4, 5, 6))
def _decode_attention(q, k, v, mask, scale, interpret, setting):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    b, _, h, d = q.shape
    s, kv = k.shape[1], k.shape[2]
    g = h // kv
    qg = q.reshape(b, kv, g, d)
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, _MIN_ROWS - g), (0, 0)))  # [B, K, 16, D]
    visible = jnp.broadcast_to(mask, (b, 1, 1, s)).reshape(b, s).astype(jnp.int32)
    most, warps, stages = setting
    block = _block(s, most)
    kernel = functools.partial(_kernel, scale=float(scale), block=block, steps=s // block)
    out = pl.pallas_call(
        kernel,
        grid=(b, kv),
        in_specs=[
            pl.BlockSpec((None, None, _MIN_ROWS, d), lambda i, j: (i, j, 0, 0)),
            pl.BlockSpec((None, s, None, d), lambda i, j: (i, 0, j, 0)),
            pl.BlockSpec((None, s, None, d), lambda i, j: (i, 0, j, 0)),
            pl.BlockSpec((None, s), lambda i, j: (i, 0)),
        ],
        out_specs=pl.BlockSpec((None, None, _MIN_ROWS, d), lambda i, j: (i, j, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((b, kv, _MIN_ROWS, d), q.dtype),
        compiler_params=None if interpret else plgpu.CompilerParams(num_warps=warps, num_stages=stages),
        interpret=interpret,
        name="jaxrlhf_decode_attention",
    )(qg, k.astype(q.dtype), v.astype(q.dtype), visible)
    return out[:, :, :g].reshape(b, 1, h, d)
