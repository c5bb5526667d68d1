"""Multi-head / grouped-query attention with masks, ALiBi, sliding windows and a static KV cache.

Shapes: B batch, T query length, S key length (= T, or the cache length), H query heads, K kv heads,
G = H / K queries per kv head, D head dim.

``attend`` is the math:  ``out[b,t,h] = softmax_s(scale * q[b,t,h] . k[b,s,h//G] + bias[b,h,t,s]
(masked to -inf where mask[b,t,s] is False)) . v[b,s,h//G]``. The plain path never repeats K/V: queries are
reshaped to ``[B, T, K, G, D]`` and contracted against ``[B, S, K, D]``. The fused path calls
``jax.nn.dot_product_attention`` (cuDNN flash attention on GPU for bf16/fp16, XLA elsewhere).
``impl="auto"`` (:func:`resolve_attention_impl`) picks the fused kernel where cuDNN serves it (GPU, bf16 /
fp16) and the plain path elsewhere, logging the choice once; a cuDNN refusal at trace time falls back to
XLA's fused implementation with a warning, never silently. A decode step on the fused path (one query token
over the KV cache, GPU, bf16 / fp16) runs the Pallas kernel of :mod:`jaxrlhf.models._decode_attention`:
scores, softmax and the value product in one pass over the cache.

Packed and padded rows on the fused path (:func:`segment_layout`): instead of a dense ``[B, 1, T, S]`` mask
(which makes cuDNN read a bias and run every score block, causal or not), the kernel takes each row's
segments as lengths + offsets (cuDNN's packed "THD" layout, causal within each segment), so it skips the
blocks above the diagonal and between segments. A segment is a run of tokens with one nonzero segment id (or
of ``attention_mask = 1``); a token attends to the earlier tokens of its own run. Padding joins the run before
it (padding before the first real token is a run of its own): every slot lies in some run, so the kernel
writes every output and every input cotangent, and no select has to clean padding slots up. Real tokens
never see padding (it comes after them in their run), padding outputs reach no real token, so a loss on real
tokens gives padding slots exactly zero cotangents. Used when the caller passes ``max_segments``
(``models.forward``), promising rows of at most that many runs with increasing ids and positions that step
by one inside a run (what ``data.packing`` and every loader produce); a row that breaks the promise gets NaN
outputs (the loss and the divergence guard see it), never a silently wrong mask.

Shared-prefix pairs (:class:`PairLayout`, DPO's chosen / rejected): a row ``[prefix | continuation 1 |
continuation 2 | pad]`` computes the shared prompt once; each continuation attends to the prefix and to its
own earlier tokens, never to the other continuation. The plain path is that dense mask; the fused path copies
each continuation's queries / keys / values next to the prefix's ("virtual rows" ``[prefix, continuation]``,
by per-row gathers whose custom VJPs are gathers too) and runs the same per-row causal kernel as two
separate rows would.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from jaxrlhf.models import _decode_attention
from jaxrlhf.models.layers import Dense, apply_rope
from jaxrlhf.sharding import constrain

_NEG = -1e30  # finite "minus infinity": fully masked (padding) rows give a uniform softmax, not NaN
ATTENTION_IMPLS = ("auto", "plain", "fused")
logger = logging.getLogger("jaxrlhf.attention")
_LOGGED: set = set()


def _log_once(level: int, key: Any, msg: str, *args: Any) -> None:
    if key not in _LOGGED:
        _LOGGED.add(key)
        logger.log(level, msg, *args)


def resolve_attention_impl(impl: str, dtype: Any = None, backend: str | None = None) -> str:
    """``"plain"`` or ``"fused"`` for a configured ``attention_impl`` (``"auto"``, ``"plain"``, ``"fused"``).

    ``"auto"``: ``"fused"`` when the backend is a GPU and the compute ``dtype`` is bf16 / fp16 (cuDNN flash
    attention: no ``[B, H, T, S]`` f32 scores in memory), else ``"plain"`` (CPU / TPU / f32, where the
    fused call would be XLA's own unfused math anyway). The choice is logged once per (dtype, backend).
    ``backend`` defaults to ``jax.default_backend()``; ``dtype`` None counts as float32.
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    backend = backend or jax.default_backend()
    dt = jnp.dtype(dtype or jnp.float32)
    chosen = "fused" if backend in ("gpu", "cuda", "rocm") and dt in (jnp.bfloat16, jnp.float16) else "plain"
    _log_once(
        logging.INFO,
        ("auto", dt.name, backend),
        "attention_impl auto -> %s (%s on %s)",
        chosen,
        dt.name,
        backend,
    )
    return chosen


def make_mask(
    q_slot: jax.Array,
    kv_slot: jax.Array,
    kv_valid: jax.Array,
    q_pos: jax.Array | None = None,
    kv_pos: jax.Array | None = None,
    window: int | None = None,
    q_segment: jax.Array | None = None,
    kv_segment: jax.Array | None = None,
) -> jax.Array:
    """Boolean ``[B, 1, T, S]``: key valid, ``kv_slot <= q_slot`` (causal), same segment, inside the window.

    ``q_slot [T]`` / ``kv_slot [S]`` are cache slots (or plain indices); the window compares positions:
    a key is visible when ``q_pos - kv_pos < window`` (Mistral / HF ``sliding_window`` semantics).
    """
    mask = kv_valid[:, None, :] & (kv_slot[None, :] <= q_slot[:, None])[None]  # [B, T, S]
    if window is not None:
        mask = mask & ((q_pos[:, :, None] - kv_pos[:, None, :]) < window)
    if q_segment is not None:
        mask = mask & (q_segment[:, :, None] == kv_segment[:, None, :])
    return mask[:, None]


class SegmentLayout(NamedTuple):
    """Per-row segments of a ``[B, T]`` self-attention batch (see :func:`segment_layout`).

    ``seqlen [B, M]`` / ``offsets [B, M + 1]``: length and first slot of each segment, -1 past the last
    (cuDNN's packed layout); ``run [B, T]``: the 1-based segment of each slot (0: a slot of no segment, whose
    output is left undefined: only the pair path's virtual padding, which nothing reads); ``ok [B]`` or None:
    the row keeps the contract (at most ``max_segments`` runs, increasing ids), else its outputs are NaN.
    None: the caller has checked it already (``models.forward`` makes a breaking row's embeddings NaN once
    instead of masking every layer's output).
    """

    seqlen: jax.Array
    offsets: jax.Array
    run: jax.Array
    ok: jax.Array | None

    def dense_mask(self, window: int | None = None) -> jax.Array:
        """The layout as a boolean ``[B, 1, T, T]`` mask: same run, causal (and ``q - k < window``)."""
        t = self.run.shape[1]
        idx = jnp.arange(t)
        same = self.run[:, :, None] == self.run[:, None, :]
        mask = same & (idx[None, None, :] <= idx[None, :, None])
        if window is not None:
            mask = mask & ((idx[:, None] - idx[None, :]) < window)[None]
        return mask[:, None]


def segment_layout(segments: jax.Array, max_segments: int) -> SegmentLayout:
    """Runs of one nonzero id in ``segments [B, T]`` (0 = padding) -> :class:`SegmentLayout`.

    A run starts where the id is nonzero and differs from the previous token's; padding joins the run before
    it, and padding at the start of a row is a run of its own (so every slot has a run and the fused kernel
    writes every output). The row is ``ok`` when it has at most ``max_segments`` runs of real tokens, at most
    ``M = max(max_segments, 2)`` runs in all (a left-padded row with ``max_segments >= 2`` real runs does not
    fit) and each run's id exceeds every id before it (so no id has two runs, which a dense same-id mask
    would join). M columns: cuDNN treats one column as an unpacked batch.
    """
    b, t = segments.shape
    m = max(int(max_segments), 2)
    seg = segments.astype(jnp.int32)
    valid = seg != 0
    prev = jnp.pad(seg[:, :-1], ((0, 0), (1, 0)))
    start = valid & (seg != prev)
    lead = (jnp.arange(t) == 0)[None, :] & ~valid  # leading padding: a run of its own
    begin = start | lead
    run = jnp.cumsum(begin, axis=1, dtype=jnp.int32)
    n_runs = run[:, -1]
    seen = jnp.pad(jax.lax.cummax(seg, axis=1)[:, :-1], ((0, 0), (1, 0)))
    ok = (jnp.sum(start, axis=1) <= max_segments) & (n_runs <= m) & jnp.all(~start | (seg > seen), axis=1)
    col = jnp.arange(1, m + 1, dtype=jnp.int32)
    hit = run[:, :, None] == col[None, None, :]  # [B, T, M]
    length = hit.sum(axis=1, dtype=jnp.int32)
    first = jnp.where(hit & begin[:, :, None], jnp.arange(t, dtype=jnp.int32)[None, :, None], 0).sum(axis=1)
    present = col[None, :] <= n_runs[:, None]
    seqlen = jnp.where(present, length, -1)
    offsets = jnp.concatenate([jnp.where(present, first, -1), jnp.full((b, 1), -1, jnp.int32)], axis=1)
    return SegmentLayout(seqlen, offsets, run, ok)


@flax.struct.dataclass
class PairLayout:
    """Rows holding one prefix and two continuations: ``[prefix | cont. 1 | cont. 2 | pad]`` ([B, L]).

    Per row: ``shared [B]`` = s (prefix tokens), ``split [B]`` = a (end of continuation 1), ``end [B]`` = e
    (end of continuation 2), ``0 <= s <= a <= e <= L``. Token t of continuation 2 stands for token
    ``s + t - a`` of its own sequence ``[prefix, cont. 2]``: positions are ``t`` below ``a`` and
    ``s + t - a`` from ``a`` on. Attention: ``u`` is visible to ``t`` iff ``u <= t``, u is a real token and
    (``u < s`` or u and t lie in the same part). Every layer thus computes what the two rows
    ``[prefix, cont. 1]`` and ``[prefix, cont. 2]`` would, with the prefix's projections and MLP done once.

    ``virtual_len`` (static) V >= ``a`` and >= ``s + e - a`` for every row: the length of those two rows on
    the fused path. A row breaking the contract gets NaN outputs (``ok``).
    """

    shared: jax.Array
    split: jax.Array
    end: jax.Array
    virtual_len: int = flax.struct.field(pytree_node=False)

    def _cols(self, n):
        return tuple(x[:, None] for x in (self.shared, self.split, self.end)) + (jnp.arange(n)[None, :],)

    def ok(self, length: int) -> jax.Array:
        """[B] bool: the row keeps the contract for a packed length ``length``."""
        s, a, e, v = self.shared, self.split, self.end, self.virtual_len
        return (0 <= s) & (s <= a) & (a <= e) & (e <= length) & (a <= v) & (s + e - a <= v)

    def part(self, length: int) -> jax.Array:
        """[B, L] int32: 0 prefix, 1 continuation 1, 2 continuation 2, -1 padding."""
        s, a, e, t = self._cols(length)
        return jnp.where(t < s, 0, jnp.where(t < a, 1, jnp.where(t < e, 2, -1))).astype(jnp.int32)

    def positions(self, length: int) -> jax.Array:
        """[B, L] int32 positions (continuation 2 restarts at ``s``; padding 0)."""
        s, a, e, t = self._cols(length)
        return jnp.where(t < a, t, jnp.where(t < e, s + t - a, 0)).astype(jnp.int32)

    def dense_mask(self, length: int, window: int | None = None) -> jax.Array:
        """The layout as a boolean ``[B, 1, L, L]`` mask (``window``: ``pos_q - pos_k < window``)."""
        part = self.part(length)
        idx = jnp.arange(length)
        pq, pk = part[:, :, None], part[:, None, :]
        mask = (pk >= 0) & (pq >= 0) & ((pk == 0) | (pk == pq)) & (idx[None, None, :] <= idx[None, :, None])
        if window is not None:
            pos = self.positions(length)
            mask = mask & ((pos[:, :, None] - pos[:, None, :]) < window)
        return mask[:, None]

    def tables(self, length: int):
        """Index tables of the fused path for packed length L and V = ``virtual_len`` (per row):

        ``src [B, 2V]``: the packed slot each virtual slot reads (virtual row 1 = ``[prefix, cont. 1]`` in
        slots ``[0, V)``, row 2 = ``[prefix, cont. 2]`` in ``[V, 2V)``; L = a zero slot); ``back [B, L]``: the
        virtual slot whose output a packed slot takes (2V = none); ``back2 [B, L]``: the second virtual slot
        that reads a prefix slot (its copy in row 2); ``main [B, 2V]``: the slot is some packed slot's
        ``back`` (slots of row 2 that copy the prefix are not); ``lengths [B, 2]``: (a, s + e - a).
        """
        v = self.virtual_len
        s, a, e, tv = self._cols(v)
        tl = jnp.arange(length)[None, :]
        n2 = s + e - a
        src = jnp.concatenate(
            [jnp.where(tv < a, tv, length), jnp.where(tv < s, tv, jnp.where(tv < n2, a + tv - s, length))],
            axis=1,
        )
        back = jnp.where(tl < a, tl, jnp.where(tl < e, v + s + tl - a, 2 * v))
        back2 = jnp.where(tl < s, v + tl, 2 * v)
        main = jnp.concatenate([tv < a, (tv >= s) & (tv < n2)], axis=1)
        src = jnp.clip(src, 0, length).astype(jnp.int32)
        back, back2 = (jnp.clip(x, 0, 2 * v).astype(jnp.int32) for x in (back, back2))
        return src, back, back2, main, jnp.concatenate([a, n2], axis=1).astype(jnp.int32)


def _take_rows(x: jax.Array, idx: jax.Array) -> jax.Array:
    """``x [B, N, ...]`` with a zero slot appended at N, read at ``idx [B, M]`` -> ``[B, M, ...]``."""
    xp = jnp.concatenate([x, jnp.zeros((x.shape[0], 1, *x.shape[2:]), x.dtype)], axis=1)
    return jnp.take_along_axis(xp, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


@jax.custom_vjp
def _expand(x, src, back, back2):
    """Packed ``[B, L, ...]`` -> virtual ``[B, 2V, ...]`` (``y[v] = x[src[v]]``). Its transpose sums, for each
    packed slot, the (at most two) virtual slots that read it: a gather too, not a scatter-add."""
    return _take_rows(x, src)


def _expand_fwd(x, src, back, back2):
    return _take_rows(x, src), (src, back, back2)


def _expand_bwd(res, g):
    src, back, back2 = res
    return _take_rows(g, back) + _take_rows(g, back2), None, None, None


_expand.defvjp(_expand_fwd, _expand_bwd)


@jax.custom_vjp
def _collect(y, back, src, main):
    """Virtual ``[B, 2V, ...]`` -> packed ``[B, L, ...]`` (``x[t] = y[back[t]]``, one slot each); its
    transpose is ``g[src[v]]`` on the ``main`` slots, 0 elsewhere."""
    return _take_rows(y, back)


def _collect_fwd(y, back, src, main):
    return _take_rows(y, back), (back, src, main)


def _collect_bwd(res, g):
    back, src, main = res
    dy = _take_rows(g, src)
    dy = jnp.where(main.reshape(main.shape + (1,) * (g.ndim - 2)), dy, jnp.zeros((), dy.dtype))
    return dy, None, None, None


_collect.defvjp(_collect_fwd, _collect_bwd)


def _paired(q, k, v, layout: PairLayout, bias, *, scale, impl, window):
    """Attention of packed pair rows (:class:`PairLayout`). Plain path (or an ALiBi bias): the dense mask on
    the packed row. Fused: the two virtual rows per packed row through :func:`_segmented` (one causal run
    each), then each packed slot takes its virtual slot's output."""
    b, length = q.shape[:2]
    ok = layout.ok(length)
    if impl != "fused" or bias is not None:
        mask = layout.dense_mask(length, window)
        if impl == "fused":
            out = _fused(q, k, v, mask, bias, scale=scale, is_causal=False)
        else:
            out = attend(q, k, v, mask, bias, scale=scale, impl="plain")
        valid = (layout.part(length) >= 0)[:, :, None, None]
        out = jnp.where(valid, out, jnp.zeros((), out.dtype))
    else:
        vl = layout.virtual_len
        src, back, back2, main, lengths = layout.tables(length)

        def virt(x):  # [B, L, N, D] -> [2B, V, N, D]: rows (2i, 2i + 1) = the two virtual rows of row i
            return _expand(x, src, back, back2).reshape(2 * b, vl, *x.shape[2:])

        n = lengths.reshape(2 * b)
        t = jnp.arange(vl)[None, :]
        m = 2
        seqlen = jnp.concatenate([n[:, None], jnp.full((2 * b, m - 1), -1, jnp.int32)], axis=1)
        offsets = jnp.concatenate([jnp.zeros((2 * b, 1), jnp.int32), jnp.full((2 * b, m), -1, jnp.int32)], 1)
        run = (t < n[:, None]).astype(jnp.int32)  # virtual padding (run 0): never read by _collect
        vlayout = SegmentLayout(seqlen, offsets, run, None)  # the contract check is the where below
        out = _segmented(virt(q), virt(k), virt(v), vlayout, scale=scale, impl=impl, window=window)
        out = _collect(out.reshape(b, 2 * vl, *out.shape[2:]), back, src, main)
    return jnp.where(ok[:, None, None, None], out, jnp.full((), jnp.nan, out.dtype))


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None,
    bias: jax.Array | None = None,
    *,
    scale: float,
    impl: str = "plain",
    is_causal: bool = False,
    window: int | None = None,
) -> jax.Array:
    """Attention of ``q [B,T,H,D]`` over ``k, v [B,S,K,D]`` -> ``[B,T,H,D]``.

    ``mask`` broadcasts to ``[B, 1, T, S]`` (True = visible), or is a :class:`SegmentLayout` (self-attention,
    no bias: causal within each segment) or a :class:`PairLayout` (self-attention of shared-prefix
    pairs); ``bias`` to ``[B, H, T, S]`` (added to the scaled scores, float32). ``is_causal`` lets the
    fused path use the kernel's own causal mask when ``mask`` is None. The fused path runs a one-token
    query over a cache (T == 1, a mask, no bias) through the decode kernel of
    :mod:`jaxrlhf.models._decode_attention` on a GPU. Scores and softmax are float32; the
    value product is in v's dtype.
    """
    impl = resolve_attention_impl(impl, q.dtype)
    if isinstance(mask, PairLayout):
        return _paired(q, k, v, mask, bias, scale=scale, impl=impl, window=window)
    if isinstance(mask, SegmentLayout):
        return _segmented(q, k, v, mask, scale=scale, impl=impl, window=window)
    if impl == "fused":
        out = _decode_kernel(q, k, v, mask, scale) if bias is None and mask is not None else None
        if out is not None:
            return out
        return _fused(q, k, v, mask, bias, scale=scale, is_causal=is_causal)
    b, t, h, d = q.shape
    kv = k.shape[2]
    g = h // kv
    qg = q.reshape(b, t, kv, g, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    if bias is not None:
        scores = scores + bias.astype(jnp.float32).reshape(b, kv, g, *bias.shape[-2:])
    if mask is None and is_causal:
        s = k.shape[1]
        mask = (jnp.arange(s)[None, :] <= jnp.arange(t)[:, None] + (s - t))[None, None]
    if mask is not None:
        scores = jnp.where(mask[:, :, None], scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, d)


def _decode_kernel(q, k, v, mask, scale):
    """A one-token query over a cache on a GPU in bf16 / fp16 through the fused decode kernel
    (:mod:`jaxrlhf.models._decode_attention`) instead of cuDNN, or None where it does not serve (the caller
    keeps cuDNN / XLA); the choice is logged once per shape.

    Under a device mesh in context the kernel runs per shard (``shard_map`` over the batch and head axes the
    logical rules give q and the cache: a Pallas call has no partitioning rule of its own, so without this
    XLA would gather the cache onto every device). A mesh that splits q's heads and the cache's kv heads
    differently (a shard's query heads would not sit beside their kv heads) is not served."""
    from jaxrlhf import sharding

    if jax.default_backend() != "gpu" or not _decode_attention.supported(q.shape, k.shape, q.dtype):
        return None
    mesh = sharding.current_mesh()
    specs = None
    if mesh is not None and mesh.size > 1:
        qs = sharding.logical_to_spec(("batch", None, "act_heads", None), mesh, q.shape)
        ks = sharding.logical_to_spec(("batch", None, "act_kv_heads", None), mesh, k.shape)
        if qs[0] != ks[0] or qs[2] != ks[2]:
            _log_once(
                logging.INFO, ("decode-mesh", q.shape, k.shape),
                "attention: decode step q %s / cache %s shard differently over the mesh (%s vs %s): the "
                "fused decode kernel is not used", q.shape, k.shape, qs, ks,
            )  # fmt: skip
            return None
        specs = (qs, ks)
    _log_once(
        logging.INFO, ("decode", q.shape, k.shape, q.dtype.name),
        "attention: decode step q %s over cache %s %s -> the fused decode kernel", q.shape, k.shape,
        q.dtype.name,
    )  # fmt: skip

    def local(q, k, v, m):
        return _decode_attention.decode_attention(q, k, v, m, scale=scale)

    if specs is None:
        return local(q, k, v, mask)
    qs, ks = specs
    mask = jnp.broadcast_to(mask, (q.shape[0], 1, 1, k.shape[1]))
    ms = jax.sharding.PartitionSpec(qs[0], None, None, None)
    kw = {"mesh": mesh} if isinstance(mesh, jax.sharding.Mesh) else {}
    return jax.shard_map(local, in_specs=(qs, ks, ks, ms), out_specs=qs, check_vma=False, **kw)(q, k, v, mask)


def _fused(q, k, v, mask, bias, *, scale, is_causal):
    b, t, h, _ = q.shape
    if bias is not None:
        bias = jnp.broadcast_to(bias.astype(q.dtype), (b, h, t, k.shape[1]))
    if mask is not None:
        mask = jnp.broadcast_to(mask, (b, 1, t, k.shape[1]))
    causal = is_causal and mask is None
    gpu = jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
    if gpu:
        try:
            return jax.nn.dot_product_attention(
                q, k, v, bias=bias, mask=mask, scale=scale, is_causal=causal, implementation="cudnn"
            )
        except Exception as e:  # unsupported shape / cuDNN missing: the XLA path below is always available
            _log_once(
                logging.WARNING,
                ("fallback", q.shape, k.shape, q.dtype.name, mask is None, bias is None),
                "cuDNN attention refused q %s k %s %s (%s: %s); using the XLA implementation",
                q.shape, k.shape, q.dtype.name, type(e).__name__, str(e).splitlines()[0] if str(e) else "",
            )  # fmt: skip
    return jax.nn.dot_product_attention(
        q, k, v, bias=bias, mask=mask, scale=scale, is_causal=causal, implementation="xla"
    )


def _segmented(q, k, v, layout: SegmentLayout, *, scale, impl, window):
    """Attention under a :class:`SegmentLayout`: cuDNN's packed kernel on GPU (fused, bf16 / fp16), else
    the layout's dense mask. No select touches q / k / v or the output: every slot a caller reads lies in a
    segment (:func:`segment_layout`), so the kernel writes it; rows that broke the contract give NaN (here
    when ``layout.ok`` is given, else the caller has made them NaN)."""
    out = None
    if impl == "fused" and jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
        try:
            from jax._src.cudnn import fused_attention_stablehlo as cudnn

            out = cudnn.dot_product_attention(
                q, k, v,
                q_seqlen=layout.seqlen, kv_seqlen=layout.seqlen,
                q_offsets=layout.offsets, kv_offsets=layout.offsets,
                scale=scale, mask_type=cudnn.MaskType.PADDING_CAUSAL,
                sliding_window_length=window,
            )  # fmt: skip
        except Exception as e:  # an older JAX / cuDNN without the packed layout: the dense mask below
            _log_once(
                logging.WARNING,
                ("segments-fallback", q.shape, k.shape, q.dtype.name),
                "cuDNN packed-segment attention refused q %s k %s (%s: %s); using a dense mask",
                q.shape, k.shape, type(e).__name__, str(e).splitlines()[0] if str(e) else "",
            )  # fmt: skip
    if out is None:
        mask = layout.dense_mask(window)
        if impl == "fused":
            out = _fused(q, k, v, mask, None, scale=scale, is_causal=False)
        else:
            out = attend(q, k, v, mask, scale=scale, impl="plain")
    if layout.ok is None:
        return out
    return jnp.where(layout.ok[:, None, None, None], out, jnp.full((), jnp.nan, out.dtype))


class Attention(nn.Module):
    """Self-attention: projections, RoPE, optional KV-cache write, ``attend``, output projection.

    ``cache`` (optional) is ``{"k": [B,S,K,D], "v": [B,S,K,D]}``; the T new keys/values are written at slots
    ``[index, index + T)`` and attention runs over all S slots under ``mask``.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    use_bias: bool = False
    compute_dtype: Any = None
    lora_config: Any = None
    impl: str = "plain"
    window: int | None = None  # sliding window, used with a SegmentLayout mask (a dense mask holds its own)

    @nn.compact
    def __call__(self, x, mask, bias=None, rope=None, cache=None, index=None, is_causal=False):
        b, t, e = x.shape
        dense = dict(use_bias=self.use_bias, compute_dtype=self.compute_dtype, lora_config=self.lora_config)
        hd, kd = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if self.has_variable("params", "qkv_proj"):  # fused by models.fuse_projections (generation)
            qkv = Dense(hd + 2 * kd, ("embed", "heads"), name="qkv_proj", **dense)(x)
            q, k, v = jnp.split(qkv, [hd, hd + kd], axis=-1)
        else:
            q = Dense(hd, ("embed", "heads"), name="q_proj", **dense)(x)
            k = Dense(kd, ("embed", "kv_heads"), name="k_proj", **dense)(x)
            v = Dense(kd, ("embed", "kv_heads"), name="v_proj", **dense)(x)
        q = constrain(q.reshape(b, t, self.num_heads, self.head_dim), ("batch", "length", "act_heads", None))
        k = constrain(
            k.reshape(b, t, self.num_kv_heads, self.head_dim), ("batch", "length", "act_kv_heads", None)
        )
        v = constrain(
            v.reshape(b, t, self.num_kv_heads, self.head_dim), ("batch", "length", "act_kv_heads", None)
        )
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        new_cache = None
        if cache is not None:
            zero = jnp.zeros((), jnp.int32)
            ck = jax.lax.dynamic_update_slice(
                cache["k"], k.astype(cache["k"].dtype), (zero, index, zero, zero)
            )
            cv = jax.lax.dynamic_update_slice(
                cache["v"], v.astype(cache["v"].dtype), (zero, index, zero, zero)
            )
            names = ("batch", "cache_length", "act_kv_heads", None)
            new_cache = {"k": constrain(ck, names), "v": constrain(cv, names)}
            k, v = ck.astype(q.dtype), cv.astype(q.dtype)
        out = attend(
            q, k, v, mask, bias, scale=self.head_dim**-0.5, impl=self.impl, is_causal=is_causal,
            window=self.window,
        )  # fmt: skip
        out = constrain(out, ("batch", "length", "act_heads", None)).reshape(b, t, hd)
        y = Dense(e, ("heads", "embed"), name="o_proj", **dense)(out)
        return y, new_cache
