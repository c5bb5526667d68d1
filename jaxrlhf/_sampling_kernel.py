"""The top-p threshold search as GPU kernels (Pallas, Triton): a min/max pass, then 8 or 9 passes, no sort.

Shapes: B rows, V vocabulary, G programs per row (each a contiguous run of blocks), 16 candidates a pass.

Per row of the scaled, masked logits ``x [B, V]`` (f32, -inf = excluded) with ``m = max_v x_v`` the kernels
find the same threshold as :func:`jaxrlhf._sampling._threshold` with weights ``w_v = exp(x_v - m)`` and
target ``top_p * Z`` (``Z = sum_v w_v``: the softmax's normaliser, so the target equals ``top_p`` in
probabilities): the largest key ``t`` with

    S(t) = sum_v w_v [key_v >= t]  >=  top_p * Z

(``key`` = :func:`jaxrlhf._sampling._ordered_keys`, an order-preserving uint32 image of the float). ``S`` is
non-increasing in ``t``, so ``t`` is found by narrowing a bracket of keys ``[lo, hi]`` that holds it: a pass
computes the 16 sums ``S(lo + j step)`` (``step`` = :func:`_step`, about a 16th of the bracket), and the
next pass narrows the bracket to the keys from the largest candidate whose sum reaches the target up to the
next candidate (the first candidate, ``lo``, always qualifies). From the bracket of all 2^32 keys the
candidates are the radix digits (4 bits a pass) and eight passes give all 32 bits. With ``Tuning.grid`` the
first pass instead sums above 16 values spread over the row's ``[min, max]`` (a bracket of the values
between two of them, which on 128k-token rows holds 5-20% of the keys where the first radix digits keep half
or more: one or two fewer passes that touch every block), then 8 narrowing passes; a pass whose bracket is
one key does nothing but pass ``S(t)`` on.

Why kernels: in XLA each pass is a 15-output reduction that reads the keys and the probabilities (64 MB at
[64, 128256]) plus the second-stage reduction XLA adds for 128k-long rows, ~41 us a pass on an H200
(benchmarks/RESULTS.md, 2026-12-04). Here a pass reads only the logits (weights are recomputed in registers,
keys are compared as floats), each of the ``B x G`` programs accumulates a ``[16, block]`` tile of
compare-selects, writes its 16 partial sums, and the next pass starts by reducing its row's ``[G, 16]``
partials and narrowing the bracket itself, so a pass is one kernel and nothing else. Loads are
``evict_last`` (32.8 MB at [64, 128256] f32) and ``unroll`` blocks at a time: with one block in flight per
program a pass is bound by load latency (~1 TB/s on an H100, 2026-12-07), however little it computes.

The sums are f32 in a different order than XLA's reduction, so on nearly flat rows a boundary token can move
when two sums straddle the target by less than their rounding (the same as any two summation orders); the
kept set is otherwise the XLA path's, which the tests check in Pallas' interpreter.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp

logger = logging.getLogger("jaxrlhf.sampling")

RADIX = 16  # candidates a pass (4 bits of the radix search)
_BITS = 4
_INT_MIN = -(2**31)
_KEY_NEG_INF = -2139095041  # _signed_keys(-inf) = 0xFF800000 ^ 0x7FFFFFFF as int32
_KEY_POS_INF = 0x7F800000  # _signed_keys(+inf)


class Tuning(NamedTuple):
    """How the passes run (not what they compute)."""

    block: int  # keys per load (a power of two; capped at the largest one <= V)
    groups: int  # programs per row (each a contiguous run of blocks)
    warps: int  # Triton num_warps
    stages: int  # Triton num_stages
    skip: int  # first pass whose blocks skip the [16, block] tile when no key is in the bracket (8: none)
    unroll: int = 1  # blocks loaded per loop iteration (more loads in flight per program)
    grid: int = 0  # 1: a first pass over 16 values spread over [min, max], then 16-way splits of its bracket
    pred: int = 0  # 1: the tile adds as select(p, acc + w, acc) (a predicated add) instead of acc + select


DEFAULT_SETTING = Tuning(256, 16, 4, 1, 3, 4)


def _signed_keys(x: jax.Array) -> jax.Array:
    """f32 -> int32 with the same order as ``_ordered_keys(x) ^ 0x80000000`` read as signed (so signed
    compares in the kernel order exactly as unsigned compares of the uint32 keys): non-negative floats keep
    their bits, negative ones flip all but the sign; -0 is +0."""
    bits = jax.lax.bitcast_convert_type(x, jnp.int32)
    flipped = jnp.where(bits >= 0, bits, bits ^ jnp.int32(0x7FFFFFFF))
    return jnp.where(x == 0, jnp.int32(0), flipped)


def _key_float(k: jax.Array) -> jax.Array:
    """A float ``f`` with ``x >= f  <=>  _signed_keys(x) >= k`` for every non-NaN f32 ``x`` and int32 ``k``:
    the float whose key is ``k`` (the inverse of :func:`_signed_keys`; ``k = -1``, the key of no float,
    gives -0.0, which every x >= 0 passes), -inf below the key of -inf and NaN above the key of +inf (keys
    of NaN bit patterns). The kernels compare floats, not keys: no per-key bit work, FP32 compares; ``<=`` /
    ``>`` a key ``k`` are ``not >=`` / ``>=`` the key ``k + 1``."""
    bits = jnp.where(k >= 0, k, k ^ jnp.int32(0x7FFFFFFF))
    f = jax.lax.bitcast_convert_type(bits, jnp.float32)
    f = jnp.where(k < jnp.int32(_KEY_NEG_INF), jnp.float32(-jnp.inf), f)
    return jnp.where(k > jnp.int32(_KEY_POS_INF), jnp.float32(jnp.nan), f)


def _ule(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a <= b`` for int32 holding uint32 bits."""
    return (a ^ jnp.int32(_INT_MIN)) <= (b ^ jnp.int32(_INT_MIN))


def _step(lo: jax.Array, hi: jax.Array) -> jax.Array:
    """The candidates' spacing in the bracket ``[lo, hi]`` (uint32 bits in int32): with ``n = hi - lo + 1``
    keys, ``floor((n - 1) / 16) + 1`` (>= n / 16, so 16 candidates ``lo + j step`` cover the bracket and the
    candidate picked leaves at most ``step`` keys: 2^32 keys take 8 passes)."""
    return (((hi - lo) >> _BITS) & jnp.int32(0x0FFFFFFF)) + 1


def _narrow(
    lo: jax.Array, hi: jax.Array, sums: jax.Array, target: jax.Array, lane: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(lo', hi', j)``: the bracket's candidate ``j`` = the largest one inside it (``j step <= hi - lo``)
    whose sum ``S(lo + j step)`` reaches ``target`` (j = 0 always), and the keys from it up to the next
    candidate (or ``hi``)."""
    step = _step(lo, hi)
    ok = ((sums >= target) & _ule(lane * step, hi - lo)) | (lane == 0)  # j step < 2^32 (step <= 2^28)
    j = jnp.max(jnp.where(ok, lane, 0))
    new_lo = lo + j * step
    last = (j == RADIX - 1) | ~_ule((j + 1) * step, hi - lo)
    return new_lo, jnp.where(last, hi, new_lo + step - 1), j


def _grid(m: jax.Array, mn: jax.Array, lane: jax.Array) -> jax.Array:
    """The value-grid pass' 16 candidates (decreasing): ``m - j (m - mn) / 15`` for j < 15, and ``mn``."""
    delta = (m - mn) / jnp.float32(RADIX - 1)
    return jnp.where(lane == RADIX - 1, mn, m - lane.astype(jnp.float32) * delta)


def _bracket_after_grid(
    sums: jax.Array, target: jax.Array, keys: jax.Array, lane: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(lo, hi, j*)``: the bracket of keys (uint32 bits in int32) holding the threshold after the grid
    pass' sums ``S(c_j)`` (non-decreasing in j; ``S(c_15) = Z``) at its candidates' signed keys ``keys``
    [16] (written by that pass, so the bracket is the one it summed, whatever its float rounding): with
    ``j*`` the smallest j whose sum reaches the target, ``[K(c_j*), K(c_j*-1) - 1]`` (``[K(m), K(m)]`` for
    ``j* = 0``, ``c_0 = m``)."""
    jstar = jnp.min(jnp.where(sums >= target, lane, RADIX - 1))
    kl = jnp.max(jnp.where(lane == jstar, keys, _INT_MIN)) ^ jnp.int32(_INT_MIN)
    above = jnp.max(jnp.where(lane == jstar - 1, keys, _INT_MIN)) ^ jnp.int32(_INT_MIN)
    return kl, jnp.where(jstar == 0, kl, above - 1), jstar


def _add_where(p: jax.Array, acc: jax.Array, w: jax.Array, pred: int) -> jax.Array:
    """``acc + w`` where ``p``: as a select of the sum (``pred``: a predicated add) or an add of a select."""
    return jnp.where(p, acc + w, acc) if pred else acc + jnp.where(p, w, 0.0)


def _blocks(x_ref, g, *, vocab, block, per, unroll, evict):
    """``load(i)``: the ``unroll`` blocks of program g's loop iteration i, each ``(keep [1, block] bool,
    x [1, block] f32)``; the last block of the row ends at V (its overlap with the one before is not kept)
    and blocks past the row keep nothing."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    n_blocks = -(-vocab // block)
    offs = jax.lax.broadcasted_iota(jnp.int32, (1, block), 1)

    def one(c):
        start = jnp.minimum(c * block, vocab - block)
        keep = ((start + offs) >= c * block) & (c < n_blocks)
        x = plgpu.load(x_ref.at[:, pl.ds(start, block)], eviction_policy="evict_last" if evict else None)
        return keep, x

    return lambda i: [one(g * per + i * unroll + r) for r in range(unroll)]


def _minmax_kernel(x_ref, max_ref, min_ref, *, vocab, block, per, unroll, evict, with_min):
    """Pass 0, program (b, g): the max and (``with_min``: the grid pass needs it) the smallest finite value
    of its blocks (-inf / +inf if none), broadcast into max_ref / min_ref [16]."""
    from jax.experimental import pallas as pl

    load = _blocks(x_ref, pl.program_id(1), vocab=vocab, block=block, per=per, unroll=unroll, evict=evict)

    def body(i, carry):
        hi, lo = carry
        for keep, x in load(i):
            hi = jnp.maximum(hi, jnp.where(keep, x, -jnp.inf))
            if with_min:
                lo = jnp.minimum(lo, jnp.where(keep & (x > -jnp.inf), x, jnp.inf))
        return hi, lo

    init = (jnp.full((1, block), -jnp.inf, jnp.float32), jnp.full((1, block), jnp.inf, jnp.float32))
    hi, lo = jax.lax.fori_loop(0, per // unroll, body, init)
    max_ref[...] = jnp.broadcast_to(jnp.max(hi), (RADIX,))
    min_ref[...] = jnp.broadcast_to(jnp.min(lo), (RADIX,))


def _kernel(
    x_ref, max_ref, min_ref, z_ref, prev_ref, lo_ref, hi_ref, out_ref, lo_out_ref, hi_out_ref,
    *, vocab, block, per, unroll, top_p, kind, z_lane, evict, skip, pred,
):  # fmt: skip
    """Program (b, g): one pass over blocks ``g * per .. g * per + per - 1`` of row b.

    x_ref [1, V] f32 (the row); max_ref / min_ref [G, 16] (pass 0's maxima and finite minima of this row's
    programs: ``m``, ``mn`` = their max / min); z_ref / prev_ref [G, 16] (pass 1's and the last pass' partial
    sums of this row; ``Z`` = pass 1's lane ``z_lane``); lo_ref / hi_ref [G, 16] int32 (the last pass'
    bracket of keys ``[lo, hi]``, uint32 bits, the same in every entry; after the grid pass lo holds its 16
    candidates' signed keys); writes out_ref [16] (this program's partial sums) and lo_out_ref / hi_out_ref
    [16] (this pass' bracket).

    ``kind``: "radix" (the first pass of the radix search: bracket = every key), "grid" (a first pass whose
    candidates are 16 values spread over ``[mn, m]``, :func:`_grid`), "after_grid" (the bracket from the grid
    pass' sums, :func:`_bracket_after_grid`), "next" (the last bracket narrowed to the candidate its sums
    pick, :func:`_narrow`). In a bracket the candidates are ``lo + j step`` (:func:`_step`: the radix digits
    when the bracket is all 2^32 keys); a bracket of one key (found) makes the pass a no-op that passes its
    share of ``S(lo)`` on. Keys are compared as floats (:func:`_key_float`).

    ``skip``: keys above the bracket count in every sum and keys below it in none, so only bracket keys need
    the 16 compares; a block without one adds its above-bracket mass to a [block] accumulator and skips the
    [16, block] tile (late passes, whose bracket holds a few hundred keys of the row, skip most blocks).
    ``unroll`` blocks are loaded per loop iteration before any is used.

    Everything per block is 2-D: keys and weights ``[1, block]`` (loaded so), candidates ``[16, 1]``, so the
    ``[16, block]`` compare broadcasts without a layout change."""
    from jax.experimental import pallas as pl

    g = pl.program_id(1)
    lane = jax.lax.broadcasted_iota(jnp.int32, (RADIX,), 0)
    lane2 = jax.lax.broadcasted_iota(jnp.int32, (RADIX, 1), 0)
    first = kind in ("radix", "grid")
    load = _blocks(x_ref, g, vocab=vocab, block=block, per=per, unroll=unroll, evict=evict)
    m = jnp.max(max_ref[...])
    if not first:
        target = jnp.float32(top_p) * jnp.sum(z_ref[:, z_lane])
        parts = prev_ref[...]  # [G, 16]
        prev = jnp.sum(parts, axis=0)

    if first:
        lo, hi = jnp.int32(0), jnp.int32(-1)  # every key (the grid pass, which never skips, ignores it)
    if kind == "grid":
        grid_c = _grid(m, jnp.min(min_ref[...]), lane)  # [16] floats; their keys go to the next pass
        cand = grid_c[:, None]  # [16, 1]
    else:
        if kind == "after_grid":
            lo, hi, sel = _bracket_after_grid(prev, target, jnp.max(lo_ref[...], axis=0), lane)
        elif kind == "next":  # narrow the last bracket to the candidate its sums pick
            lo, hi, sel = _narrow(jnp.max(lo_ref[...]), jnp.max(hi_ref[...]), prev, target, lane)
        cand_keys = (lo + lane2 * _step(lo, hi)) ^ jnp.int32(_INT_MIN)  # [16, 1]: signed images
        cand = _key_float(cand_keys)  # x >= cand <=> key >= cand_key
    lo_f = _key_float(lo ^ jnp.int32(_INT_MIN))  # x >= lo_f <=> key >= lo
    hi_s = hi ^ jnp.int32(_INT_MIN)  # x >= above_f <=> key > hi (none above the largest key)
    above_f = jnp.where(hi_s == jnp.int32(2**31 - 1), jnp.float32(jnp.nan), _key_float(hi_s + 1))

    def weights(i):
        return [(jnp.where(keep, jnp.exp(x - m), 0.0), x) for keep, x in load(i)]

    def body(i, acc):
        for wt, x in weights(i):
            acc = _add_where(x >= cand, acc, wt, pred)
        return acc

    def body_skip(i, carry):
        tile, above = carry
        for wt, x in weights(i):
            up = x >= above_f
            inside = (x >= lo_f) & ~up  # [1, block]
            above = above + jnp.where(up, wt, 0.0)
            tile = jax.lax.cond(
                jnp.max(jnp.where(inside & (wt > 0), 1, 0)) > 0,  # (Triton lowers no reduce_or)
                lambda t, wt=wt, x=x, inside=inside: _add_where((x >= cand) & inside, t, wt, pred),
                lambda t: t,
                tile,
            )
        return tile, above

    zeros = jnp.zeros((RADIX, block), jnp.float32)
    steps = per // unroll

    def run(_):
        if skip:
            tile, above = jax.lax.fori_loop(0, steps, body_skip, (zeros, jnp.zeros((1, block), jnp.float32)))
            return jnp.sum(tile, axis=1) + jnp.sum(above)
        return jnp.sum(jax.lax.fori_loop(0, steps, body, zeros), axis=1)

    def found(_):  # a one-key bracket (the threshold lo is found): pass S(lo) on, this program's share of it
        rows = jax.lax.broadcasted_iota(jnp.int32, parts.shape, 0)
        mine = jnp.sum(jnp.where((rows == g) & (lane[None, :] == sel), parts, 0.0))
        return jnp.where(lane == 0, mine, 0.0)

    out_ref[...] = run(None) if first else jax.lax.cond(lo != hi, run, found, None)
    # the grid pass hands its candidates' keys on (lane j: c_j) instead of a bracket
    lo_out_ref[...] = _signed_keys(grid_c) if kind == "grid" else jnp.broadcast_to(lo, (RADIX,))
    hi_out_ref[...] = jnp.broadcast_to(hi, (RADIX,))


def tuning() -> Tuning:
    """The defaults, or the benchmarks' sweep override ``JAXRLHF_TOPP_TUNING="block,groups,warps,stages,skip
    [,unroll[,grid[,pred]]]"`` (read at trace time)."""
    raw = os.environ.get("JAXRLHF_TOPP_TUNING")
    if not raw:
        return DEFAULT_SETTING
    try:
        return Tuning(*(int(v) for v in raw.split(",")))
    except (ValueError, TypeError):
        raise ValueError(
            f"JAXRLHF_TOPP_TUNING={raw!r}: want 'block,groups,warps,stages,skip[,unroll[,grid[,pred]]]'"
        ) from None


def available() -> bool:
    """Whether the kernels compile on this backend with the current :func:`tuning` (tried once per
    setting on a [2, 4096] row; a Triton lowering this JAX lacks, or a setting Triton refuses, logs a
    warning and :func:`jaxrlhf._sampling.candidates` runs the XLA passes instead, never failing the run)."""
    return _available(tuning())


@functools.cache
def _available(setting: Tuning) -> bool:
    try:
        probe = jax.ShapeDtypeStruct((2, 4096), jnp.float32)
        jax.jit(lambda x: top_p_threshold(x, 0.9, setting=setting)).lower(probe).compile()
        return True
    except Exception as e:  # noqa: BLE001 (any lowering / compile failure means: use the XLA passes)
        first = str(e).splitlines()[0] if str(e) else ""
        logger.warning(
            "top-p Pallas kernels (setting %s) do not compile here (%s: %s); using the XLA radix passes",
            tuple(setting), type(e).__name__, first[:200],
        )  # fmt: skip
        return False


def top_p_threshold(
    x: jax.Array,
    top_p: float,
    *,
    interpret: bool = False,
    setting: Tuning | tuple[int, ...] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """``(tau [B] uint32, mass [B] f32)``: the top-p threshold key of each row of ``x [B, V]`` (f32 scaled,
    masked logits; every row holds a finite value) and the kept mass ``S(tau) / Z`` (the nucleus' share of
    the distribution). Kept set: ``_ordered_keys(x) >= tau``. ``interpret``: Pallas' interpreter (CPU tests);
    ``setting``: a :class:`Tuning` (or its fields as a tuple); ``None`` = :func:`tuning`."""
    t = Tuning(*setting) if setting is not None else tuning()
    vocab = x.shape[-1]
    block = min(t.block, 1 << (max(vocab, 16).bit_length() - 1))  # a power of two <= V
    grid = int(bool(t.grid))
    t = t._replace(
        block=block, unroll=max(1, t.unroll), grid=grid, skip=max(t.skip, grid), pred=int(bool(t.pred))
    )
    return _top_p_threshold(x, float(top_p), bool(interpret), t)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _top_p_threshold(x, top_p, interpret, t: Tuning):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    rows, vocab = x.shape
    x = x.astype(jnp.float32)[:, None, :]  # [B, 1, V]: a row is a [1, V] block
    n_blocks = -(-vocab // t.block)
    groups = max(1, min(t.groups, n_blocks))
    per = -(-n_blocks // groups)
    per = -(-per // t.unroll) * t.unroll  # whole iterations (blocks past the row are masked)
    row = pl.BlockSpec((None, 1, vocab), lambda i, j: (i, 0, 0))
    rowg = pl.BlockSpec((None, groups, RADIX), lambda i, j: (i, 0, 0))
    part = pl.BlockSpec((None, None, RADIX), lambda i, j: (i, j, 0))
    params = None if interpret else plgpu.CompilerParams(num_warps=t.warps, num_stages=t.stages)
    f32 = jax.ShapeDtypeStruct((rows, groups, RADIX), jnp.float32)
    i32 = jax.ShapeDtypeStruct((rows, groups, RADIX), jnp.int32)
    common = dict(vocab=vocab, block=t.block, per=per, unroll=t.unroll, evict=not interpret)
    hi_x, lo_x = pl.pallas_call(
        functools.partial(_minmax_kernel, with_min=bool(t.grid), **common),
        grid=(rows, groups),
        in_specs=[row],
        out_specs=[part, part],
        out_shape=[f32, f32],
        compiler_params=params,
        interpret=interpret,
        name="jaxrlhf_top_p_minmax",
    )(x)
    sums = z = jnp.zeros((rows, groups, RADIX), jnp.float32)
    lo = hi = jnp.zeros((rows, groups, RADIX), jnp.int32)
    kinds = ["grid", "after_grid"] + ["next"] * 7 if t.grid else ["radix"] + ["next"] * 7
    for k, kind in enumerate(kinds):
        kernel = functools.partial(
            _kernel, top_p=top_p, kind=kind, z_lane=RADIX - 1 if t.grid else 0, skip=k >= t.skip,
            pred=t.pred, **common,
        )  # fmt: skip
        sums, lo, hi = pl.pallas_call(
            kernel,
            grid=(rows, groups),
            in_specs=[row, rowg, rowg, rowg, rowg, rowg, rowg],
            out_specs=[part, part, part],
            out_shape=[f32, i32, i32],
            compiler_params=params,
            interpret=interpret,
            name=f"jaxrlhf_top_p_pass{k}",
        )(x, hi_x, lo_x, z, sums, lo, hi)
        if k == 0:
            z = sums
    total = jnp.sum(z[:, :, RADIX - 1 if t.grid else 0], axis=1)
    row_sums = jnp.sum(sums, axis=1)  # [B, 16]
    lane = jnp.arange(RADIX, dtype=jnp.int32)
    tau, _, best = jax.vmap(_narrow, in_axes=(0, 0, 0, 0, None))(
        lo[:, 0, 0], hi[:, 0, 0], row_sums, jnp.float32(top_p) * total, lane
    )
    mass = jnp.take_along_axis(row_sums, best[:, None], axis=1)[:, 0] / total
    return jax.lax.bitcast_convert_type(tau, jnp.uint32), mass
