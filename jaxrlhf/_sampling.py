"""Sampling transforms and the decode loop: one static config, a pure ``sample``, a model-agnostic loop.

Given the model's next-token logits ``z`` [B, V] (f32) the sampler draws from

    greedy (temperature == 0):  argmax_v z_v
    otherwise:                  p(v) ∝ exp(z_v / T) restricted to the kept set K, where K is cut, in order, by
        top-k:  z_v >= the k-th largest logit (ties at it stay, as transformers' TopKLogitsWarper does)
        top-p:  token v is kept iff  sum_{u: z_u > z_v} p_u < top_p  (the mass strictly more likely than v;
                transformers' TopPLogitsWarper up to the order it gives tied tokens; the top token stays)
        min-p:  tokens with p_v >= min_p * max_u p_u       (a threshold against the max)

and, while fewer than ``min_new_tokens`` tokens were generated, stop tokens are excluded (their logits are
set to -inf before everything else, as transformers' MinNewTokensLengthLogitsProcessor does).

For every draw it returns the token, its log-probability under the distribution it was drawn from (for greedy:
the log-softmax of the unscaled logits, as vLLM reports it), and its *raw* log-probability
``z_v - logsumexp(z)`` under the untruncated temperature-1 model distribution: the quantity a training forward
pass recomputes (PPO's ``old_logprobs``). Nothing sorts the vocabulary: the top-k and top-p cuts are exact
thresholds found by a radix search over the float bit patterns (:func:`_threshold`, 8 reductions per row).

:func:`decode_loop` runs any ``step_fn(cache, tokens, positions) -> (logits, cache)`` in a
``lax.while_loop`` over a :class:`DecodeState`; :mod:`jaxrlhf.generation` supplies the model.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to sample; frozen and hashable (a static argument of the jitted generator).

    max_new_tokens: tokens generated per row (the token buffer is [B*n, max_new_tokens]).
    temperature:    0.0 = greedy; otherwise logits are divided by it.
    top_k:          0 = off; keep the k most likely tokens.
    top_p:          1.0 = off; nucleus sampling.
    min_p:          0.0 = off; keep tokens at least ``min_p`` times as likely as the most likely one.
    min_new_tokens: stop tokens cannot be sampled before this many tokens were generated.
    stop_token_ids: tokens that end a row (the stop token itself is kept and masked valid);
                    ``None`` = the model's ``eos_token_ids``.
    n:              samples per prompt; rows ``b*n .. b*n+n-1`` of the result belong to prompt ``b``.
    pad_token_id:   filler after a row stopped; ``None`` = the model's pad token (or 0).
    """

    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    min_new_tokens: int = 0
    stop_token_ids: tuple[int, ...] | None = None
    n: int = 1
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.stop_token_ids is not None:
            ids = (self.stop_token_ids,) if isinstance(self.stop_token_ids, int) else self.stop_token_ids
            object.__setattr__(self, "stop_token_ids", tuple(int(i) for i in ids))
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(
                f"SamplingConfig.max_new_tokens must be a positive int, got {self.max_new_tokens!r}"
            )
        if self.temperature < 0 or not math.isfinite(self.temperature):
            raise ValueError(f"SamplingConfig.temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"SamplingConfig.top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingConfig.top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p < 1.0:
            raise ValueError(f"SamplingConfig.min_p must be in [0, 1), got {self.min_p}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(
                f"SamplingConfig.min_new_tokens={self.min_new_tokens} must be in [0, max_new_tokens="
                f"{self.max_new_tokens}]"
            )
        if self.n < 1:
            raise ValueError(f"SamplingConfig.n must be >= 1, got {self.n}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _gather(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x [B, C], idx [B] -> x[b, idx[b]]."""
    return jnp.take_along_axis(x, idx[:, None], axis=-1)[:, 0]


def _log_prob(logits: jax.Array, idx: jax.Array) -> jax.Array:
    """log softmax(logits)[idx] without materialising the [B, C] log-softmax."""
    return _gather(logits, idx) - jax.nn.logsumexp(logits, axis=-1)


def _stop_mask(vocab: int, stop_ids: tuple[int, ...]) -> np.ndarray:
    m = np.zeros((vocab,), bool)
    m[[i for i in stop_ids if 0 <= i < vocab]] = True
    return m


@dataclasses.dataclass(frozen=True)
class SearchMethod:
    """How :func:`candidates` finds its thresholds and :func:`sample` draws; every method gives the same
    distribution (the kept sets are the same thresholds; the draws differ only in how they use the key).

    radix_bits: bits of the key fixed per pass of :func:`_threshold`: ``2**radix_bits - 1`` sums per pass,
                ``ceil(32 / radix_bits)`` passes.
    draw:       "gumbel": ``jax.random.categorical`` over the [B, V] candidates plus a logsumexp for the
                log-probability; "cdf": inverse CDF in vocabulary order over chunk masses
                (:func:`_draw_cdf`: one pass over the row, the log-probability from the same sums).
    rank_below: top-k: a level of at most this many keys per row finds its k-th largest by counting, for
                every key, the keys at or above it (one [B, n, n] reduction, :func:`_kth_by_rank`) instead of
                ``32 / radix_bits`` dependent passes; 0 = always the radix search.
    inner_chunks: top-k: further chunk levels over the ``k * chunk`` keys the first level keeps (each one
                the same chunk-maximum prefilter, :func:`kth_largest_key`).
    top_p_kernel: top-p: "gpu" = the 8 radix passes as Pallas kernels (:mod:`jaxrlhf._sampling_kernel`)
                when the computation runs on a GPU outside a multi-device mesh, else the XLA passes;
                "interpret" = those kernels in Pallas' interpreter (CPU tests); "off" = always XLA.

    Variants timed on an H200 and dropped (2026-12-03, benchmarks/RESULTS.md "Sampling cost" and "DPO
    shared-prompt rows..."): rows cut in slices reduced in parallel, 2- / 3-bit passes, top-p weights
    recomputed from the logits in every pass: none cut top-p below the 4-bit radix's ~+0.4 ms at [64, 128256].
    """

    radix_bits: int = 4
    draw: str = "gumbel"
    rank_below: int = 0
    inner_chunks: tuple[int, ...] = ()
    top_p_kernel: str = "off"

    def __post_init__(self):
        bad_kernel = self.top_p_kernel not in ("off", "gpu", "interpret")
        if not 1 <= self.radix_bits <= 8 or self.draw not in ("gumbel", "cdf") or bad_kernel:
            raise ValueError(f"bad SearchMethod {self}")


METHODS: dict[str, SearchMethod] = {
    "radix": SearchMethod(),  # the reference: 8 whole-row passes of 15 sums, Gumbel draw
    "cdf": SearchMethod(draw="cdf"),
    # the default: each part's fastest on an H200 at [64, 128256] (benchmarks/sampling_micro.py, RESULTS.md):
    # top-k by rank counting over two chunk levels (+0.109 ms / step over greedy, radix +0.362; +7.9% of a
    # batch-64 decode step end to end), top-p by the 4-bit radix, the inverse-CDF draw
    "fast": SearchMethod(draw="cdf", rank_below=1024, inner_chunks=(8,), top_p_kernel="gpu"),
    "fast_xla": SearchMethod(draw="cdf", rank_below=1024, inner_chunks=(8,)),  # "fast" without the kernels
}
DEFAULT_METHOD = "fast"


def _method(method: str | SearchMethod | None) -> SearchMethod:
    if isinstance(method, SearchMethod):
        return method
    return METHODS[DEFAULT_METHOD if method is None else method]


def sample(
    logits: jax.Array,
    rng: jax.Array,
    cfg: SamplingConfig,
    *,
    stop_ids: tuple[int, ...] = (),
    allow_stop: jax.Array | bool = True,
    method: str | SearchMethod | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Draw one token per row.

    Args:
      logits: [B, V] next-token logits (cast to f32 here).
      rng: a PRNG key; rows draw independently.
      cfg: the sampling config (static).
      stop_ids: the stop tokens (static), needed only when ``cfg.min_new_tokens > 0``.
      allow_stop: scalar or [B] bool; False excludes the stop tokens (min_new_tokens not reached yet).
      method: a :data:`METHODS` name or a :class:`SearchMethod` (static); ``None`` = ``DEFAULT_METHOD``.
    Returns:
      tokens [B] int32, logprobs [B] f32 (sampling distribution), raw_logprobs [B] f32 (model, T=1).
    """
    how = _method(method)
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    masked = logits
    if cfg.min_new_tokens > 0 and stop_ids:
        is_stop = jnp.asarray(_stop_mask(vocab, stop_ids))
        allow = jnp.broadcast_to(jnp.asarray(allow_stop), logits.shape[:1])
        masked = jnp.where(is_stop[None, :] & ~allow[:, None], -jnp.inf, logits)

    if cfg.greedy:
        tokens = jnp.argmax(masked, axis=-1).astype(jnp.int32)
        logprobs = _log_prob(masked, tokens)
    else:
        cand, ids = candidates(masked, cfg, method=how)
        if how.draw == "cdf":
            idx, logprobs = _draw_cdf(cand, rng)
        else:
            idx = jax.random.categorical(rng, cand, axis=-1).astype(jnp.int32)
            logprobs = _log_prob(cand, idx)
        tokens = idx if ids is None else _gather(ids, idx).astype(jnp.int32)
    raw_logprobs = _log_prob(logits, tokens)
    return tokens, logprobs, raw_logprobs


def candidates(
    logits: jax.Array, cfg: SamplingConfig, *, method: str | SearchMethod | None = None
) -> tuple[jax.Array, jax.Array | None]:
    """The truncated, temperature-scaled logits to draw from, in vocabulary order.

    Returns ``(cand [B, V], None)`` (``None``: candidate columns are vocabulary ids). Excluded tokens hold
    -inf, so ``softmax(cand)`` is exactly the sampling distribution. Top-k and top-p are thresholds found
    by :func:`_threshold` (eight passes over the row, no sort): top-k keeps ``z_v >= τ_k`` with ``τ_k`` the
    k-th largest value (ties at ``τ_k`` stay, as transformers' TopKLogitsWarper keeps them); top-p keeps
    ``z_v >= τ_p`` with ``τ_p`` the largest value whose upper mass ``sum_{u: z_u >= τ_p} p_u`` reaches
    ``top_p`` — i.e. token v stays iff the mass of the tokens strictly more likely than v is < ``top_p``.
    ``method`` (static) picks how the thresholds are searched (:class:`SearchMethod`), not what they are.
    """
    how = _method(method)
    scaled = logits / jnp.float32(cfg.temperature)
    vocab = scaled.shape[-1]
    top_k = 0 < cfg.top_k < vocab
    if top_k or cfg.top_p < 1.0:
        keys = _ordered_keys(scaled)
    if top_k:
        tau = kth_largest_key(
            keys,
            cfg.top_k,
            radix_bits=how.radix_bits,
            rank_below=how.rank_below,
            inner_chunks=how.inner_chunks,
        )
        scaled = jnp.where(keys >= tau[:, None], scaled, -jnp.inf)
    if cfg.top_p < 1.0:
        # the top-k keys still order the survivors; cut tokens weigh 0 and lie below tau_k <= tau_p
        if _top_p_kernel(how, scaled):
            from jaxrlhf._sampling_kernel import top_p_threshold

            tau, _ = top_p_threshold(scaled, cfg.top_p, interpret=how.top_p_kernel == "interpret")
        else:
            probs = jax.nn.softmax(scaled, axis=-1)
            tau = _threshold(keys, probs, jnp.float32(cfg.top_p), radix_bits=how.radix_bits)
        scaled = jnp.where(keys >= tau[:, None], scaled, -jnp.inf)
    if cfg.min_p > 0.0:
        threshold = jnp.max(scaled, axis=-1, keepdims=True) + jnp.float32(math.log(cfg.min_p))
        scaled = jnp.where(scaled >= threshold, scaled, -jnp.inf)
    return scaled, None


def _top_p_kernel(how: SearchMethod, scaled: jax.Array) -> bool:
    """Whether :func:`candidates` runs the top-p passes as Pallas kernels: asked for, a vocabulary of at
    least 16, and (for "gpu") a GPU backend with no multi-device mesh in context (a Pallas call has no
    partitioning rule: under a mesh the XLA passes, which shard, run instead)."""
    if how.top_p_kernel == "off" or scaled.shape[-1] < 16:
        return False
    if how.top_p_kernel == "interpret":
        return True
    from jaxrlhf.sharding import current_mesh

    mesh = current_mesh()
    if jax.default_backend() != "gpu" or (mesh is not None and mesh.size > 1):
        return False
    from jaxrlhf._sampling_kernel import available

    return available()  # compiled once; a failure is logged and the XLA passes run


_DRAW_CHUNK = 128  # the cdf draw: chunk masses over this many tokens, then one chunk's tokens


def _draw_cdf(cand: jax.Array, rng: jax.Array, chunk: int = _DRAW_CHUNK) -> tuple[jax.Array, jax.Array]:
    """Draw ``idx ~ softmax(cand)`` per row of ``cand [B, V]`` (-inf = excluded) by inverse CDF; returns
    (idx [B] int32, log-probability [B]).

    With ``w_v = exp(cand_v - max cand)`` and the row cut in chunks of ``chunk`` (the tail padded with
    -inf, weight 0): chunk masses ``M_c = sum_{v in c} w_v`` (the one pass over the row), ``W = sum_c M_c``.
    A uniform ``u1`` picks chunk ``c`` where the running sum of ``M`` first exceeds ``u1 W``, an independent
    ``u2`` picks token ``j`` inside it where the running sum of its ``w`` first exceeds ``u2 M_c``:
    ``P(v) = (M_c / W) (w_v / M_c) = w_v / W = softmax(cand)_v``. Two uniforms rather than one: a f32
    uniform has 2^-24 resolution, too coarse for one token of a flat 128k vocabulary (p ~ 1e-5) but fine
    for a chunk's share and a token's share of its chunk. Zero-weight chunks / tokens are never picked
    (the running sum must rise there); if rounding leaves ``u W`` at or past the last sum, the last
    positive one is taken. Log-probability: ``cand_v - max - log W`` (no second pass)."""
    rows, vocab = cand.shape
    top = jnp.max(cand, axis=-1)  # finite: every cut keeps the most likely token
    n = -(-vocab // chunk)
    padded = jnp.pad(cand, ((0, 0), (0, n * chunk - vocab)), constant_values=-jnp.inf)
    padded = padded.reshape(rows, n, chunk)
    mass = jnp.exp(padded - top[:, None, None]).sum(axis=-1)  # [B, n]
    u = jax.random.uniform(rng, (rows, 2), jnp.float32).T  # [rows, 2]: a row's pair does not depend on B

    def first_above(w, u):  # first column whose running sum of w exceeds u * sum(w) and whose w > 0
        run = jnp.cumsum(w, axis=-1)
        hit = (run > (u * run[:, -1])[:, None]) & (w > 0)
        last = w.shape[-1] - 1 - jnp.argmax(w[:, ::-1] > 0, axis=-1)
        return jnp.where(hit.any(-1), jnp.argmax(hit, axis=-1), last).astype(jnp.int32), run[:, -1]

    c, total = first_above(mass, u[0])
    inner = jnp.take_along_axis(padded, c[:, None, None], axis=1)[:, 0]  # [B, chunk]
    j, _ = first_above(jnp.exp(inner - top[:, None]), u[1])
    idx = c * chunk + j
    return idx, _gather(cand, idx) - top - jnp.log(total)


def _ordered_keys(x: jax.Array) -> jax.Array:
    """f32 [B, V] -> uint32 keys with ``x_a < x_b  <=>  key_a < key_b`` and ``x_a == x_b  <=>  key_a ==
    key_b`` (-inf lowest; -0 is made +0 first).

    Non-negative floats: the bit pattern with the sign bit set; negative floats: all bits flipped (a larger
    magnitude is a smaller number)."""
    x = x.astype(jnp.float32)
    bits = jax.lax.bitcast_convert_type(jnp.where(x == 0, jnp.float32(0), x), jnp.uint32)
    sign = jnp.uint32(0x80000000)
    return jnp.where(bits >= sign, ~bits, bits | sign)


_RADIX_BITS = 4  # 16 candidate thresholds per pass: 8 passes over the row for a 32-bit key
_CHUNK = 128  # top-k: the row in chunks of this many keys (kth_largest_key)


def kth_largest_key(
    keys: jax.Array,
    k: int,
    chunk: int = _CHUNK,
    *,
    radix_bits: int = _RADIX_BITS,
    rank_below: int = 0,
    inner_chunks: tuple[int, ...] = (),
) -> jax.Array:
    """The k-th largest key per row of ``keys [B, V]`` (uint32, ``_ordered_keys``), exact, without a sort.

    Two levels, so the radix search reads ``k * chunk`` keys instead of the whole row 8 times: the row is cut
    in chunks of ``chunk`` (the tail padded with key 0, below every float's key); ``L`` = the k-th largest
    chunk maximum (:func:`_threshold` over the ``V / chunk`` maxima). ``k`` chunks are kept: every chunk whose
    maximum exceeds ``L`` (at most k - 1 of them) and the first of those whose maximum equals ``L``; the
    search runs over their keys. Exact: every key above ``L`` lies in a kept chunk, so counts of keys >= t
    agree with the whole row's for every t > L; the k kept chunks each hold a key >= L, so the count at
    ``L`` is >= k; and the true k-th largest is >= L (the k largest maxima are k keys >= L). Falls back to
    the one-level search when the row has fewer than ``2 k`` chunks. ``inner_chunks``: the kept ``k * chunk``
    keys go through the same two levels again with the next chunk size (exact by the same argument);
    ``rank_below``: levels of at most that many keys use :func:`_kth_by_rank`.
    """

    def kth(x):  # the k-th largest of x [B, m], one level
        if rank_below and x.shape[1] <= rank_below:
            return _kth_by_rank(x, k)
        return _threshold(x, jnp.ones(x.shape, jnp.float32), jnp.float32(k), radix_bits=radix_bits)

    rows, vocab = keys.shape
    n = -(-vocab // chunk)
    if n < 2 * k:
        return kth(keys)
    padded = jnp.pad(keys, ((0, 0), (0, n * chunk - vocab))).reshape(rows, n, chunk)
    cmax = padded.max(axis=-1)  # [B, n]
    low = kth(cmax)  # L per row
    above = cmax > low[:, None]
    tied = cmax == low[:, None]
    room = k - above.sum(axis=1, keepdims=True)  # >= 1 tied chunks to take
    keep = above | (tied & (jnp.cumsum(tied, axis=1) <= room))  # exactly k per row
    slot = jnp.where(keep, jnp.cumsum(keep, axis=1) - 1, k)  # position among the kept; k = dropped
    ids = (
        jnp.zeros((rows, k), jnp.int32)
        .at[jnp.arange(rows)[:, None], slot]
        .set(jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (rows, n)), mode="drop")
    )
    picked = jnp.take_along_axis(padded, ids[:, :, None], axis=1).reshape(rows, k * chunk)
    if inner_chunks:
        return kth_largest_key(
            picked,
            k,
            inner_chunks[0],
            radix_bits=radix_bits,
            rank_below=rank_below,
            inner_chunks=inner_chunks[1:],
        )
    return kth(picked)


def _kth_by_rank(keys: jax.Array, k: int) -> jax.Array:
    """The k-th largest of ``keys [B, n]`` per row as ``max {x_i : #{j : x_j >= x_i} >= k}``.

    With ``s_1 >= ... >= s_n`` the row sorted, ``s_k`` qualifies (``s_1..s_k`` are ``>= s_k``) and no
    ``x_i > s_k`` does (only ``s_1..s_{k-1}`` can exceed ``s_k``): exact with any ties. One fused [B, n, n]
    compare-and-count: n^2 work, but one kernel instead of ``32 / radix_bits`` dependent passes, which is
    what a level of ~1000 keys per row is limited by."""
    at_least = jnp.sum(keys[:, None, :] >= keys[:, :, None], axis=-1, dtype=jnp.int32)  # [B, n]
    return jnp.max(jnp.where(at_least >= k, keys, jnp.uint32(0)), axis=-1)


def _threshold(
    keys: jax.Array, weights: jax.Array, target: jax.Array, *, radix_bits: int = _RADIX_BITS
) -> jax.Array:
    """Per row the largest key ``t`` with ``S(t) = sum_v weights_v [keys_v >= t] >= target`` ([B] uint32).

    ``S`` is non-increasing in ``t`` (weights >= 0), so the answer is fixed bit by bit from the top: with the
    bits above ``shift`` decided (``prefix``; ``S(prefix) >= target`` holds), the next ``r = radix_bits``
    bits are the largest ``j`` with ``S(prefix | j << shift) >= target`` (``j = 0`` always qualifies). Each
    pass is ONE variadic reduction over the row with ``2^r - 1`` sums (candidates ``j >= 1``; S at j = 0 is
    never needed), so a row's keys and weights are read once per pass, not once per candidate; ``32 / r``
    passes give the exact key (the last pass takes the bits left). Top-k: weights 1, target k -> the key of
    the k-th largest value; top-p: weights = probabilities, target p.
    """
    rows = keys.shape[0]
    weights = weights.astype(jnp.float32)
    prefix = jnp.zeros((rows,), jnp.uint32)
    zero = jnp.float32(0)

    def add(a, b):
        return tuple(x + y for x, y in zip(a, b, strict=True))

    left = 32
    while left > 0:
        width_bits = min(radix_bits, left)
        shift = left - width_bits
        radix = 1 << width_bits
        digits = jnp.arange(radix, dtype=jnp.uint32)
        cand = prefix[:, None] | (digits[None, 1:] << jnp.uint32(shift))  # [B, radix - 1]
        terms = tuple(jnp.where(keys >= cand[:, j][:, None], weights, zero) for j in range(radix - 1))
        sums = jax.lax.reduce(terms, (zero,) * (radix - 1), add, (1,))  # radix - 1 x [B]
        mass = jnp.stack([jnp.full((rows,), jnp.inf, jnp.float32), *sums], axis=1)  # [B, radix]
        ok = (mass >= target) | (digits[None, :] == 0)
        best = jnp.max(jnp.where(ok, digits[None, :], jnp.uint32(0)), axis=-1)
        prefix = prefix | (best << jnp.uint32(shift))
        left = shift
    return prefix


def sampling_probs(
    logits: jax.Array, cfg: SamplingConfig, *, method: str | SearchMethod | None = None
) -> jax.Array:
    """The full [B, V] sampling distribution (for tests and diagnostics; sorts/scatters, not for the loop)."""
    logits = logits.astype(jnp.float32)
    if cfg.greedy:
        return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
    cand, ids = candidates(logits, cfg, method=method)
    p = jax.nn.softmax(cand, axis=-1)
    if ids is None:
        return p
    return jnp.zeros_like(logits).at[jnp.arange(logits.shape[0])[:, None], ids].set(p)


# ---------------------------------------------------------------------------------------------- decode loop

StepFn = Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, Any]]


class DecodeState(NamedTuple):
    """The while-loop carry. B rows, N = token-buffer length."""

    step: jax.Array  # int32 scalar: tokens sampled so far
    cache: Any  # the model's KV cache
    next_token: jax.Array  # [B] int32 token fed at this step
    next_pos: jax.Array  # [B] int32 its position
    tokens: jax.Array  # [B, N] int32
    logprobs: jax.Array  # [B, N] f32
    raw_logprobs: jax.Array  # [B, N] f32
    done: jax.Array  # [B] bool: emitted a stop token
    lengths: jax.Array  # [B] int32 valid tokens so far
    rng: jax.Array


def decode_loop(
    step_fn: StepFn, state: DecodeState, cfg: SamplingConfig, max_new: jax.Array, until: jax.Array
):
    """Run ``while step < min(max_new, until) & ~all(done)``: feed, sample, record.

    ``step_fn(cache, tokens [B], positions [B]) -> (logits [B, V], cache)`` is the model; ``cfg`` carries the
    resolved ``stop_token_ids`` and ``pad_token_id`` (see :func:`_resolve`). Keys are ``fold_in(rng, step)``,
    so chunked decoding (``until`` < ``max_new``) draws exactly what one long call draws.
    """
    stop_ids = cfg.stop_token_ids or ()
    stop_arr = jnp.asarray(stop_ids if stop_ids else (-1,), jnp.int32)
    limit = jnp.minimum(max_new, until)
    pad = cfg.pad_token_id or 0

    def cond(s: DecodeState):
        return (s.step < limit) & ~jnp.all(s.done)

    def body(s: DecodeState) -> DecodeState:
        logits, cache = step_fn(s.cache, s.next_token, s.next_pos)
        tok, lp, raw = sample(
            logits,
            jax.random.fold_in(s.rng, s.step),
            cfg,
            stop_ids=stop_ids,
            allow_stop=s.step >= cfg.min_new_tokens,
        )
        active = ~s.done
        tok = jnp.where(active, tok, pad).astype(jnp.int32)
        zero = jnp.zeros_like(lp)
        write = lambda buf, x: jax.lax.dynamic_update_slice(buf, x[:, None].astype(buf.dtype), (0, s.step))
        stopped = active & jnp.any(tok[:, None] == stop_arr[None, :], axis=-1) if stop_ids else s.done
        return DecodeState(
            step=s.step + 1,
            cache=cache,
            next_token=tok,
            next_pos=s.next_pos + 1,
            tokens=write(s.tokens, tok),
            logprobs=write(s.logprobs, jnp.where(active, lp, zero)),
            raw_logprobs=write(s.raw_logprobs, jnp.where(active, raw, zero)),
            done=s.done | stopped,
            lengths=s.lengths + active.astype(jnp.int32),
            rng=s.rng,
        )

    return jax.lax.while_loop(cond, body, state)
