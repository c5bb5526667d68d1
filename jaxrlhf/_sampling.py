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


def sample(
    logits: jax.Array,
    rng: jax.Array,
    cfg: SamplingConfig,
    *,
    stop_ids: tuple[int, ...] = (),
    allow_stop: jax.Array | bool = True,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Draw one token per row.

    Args:
      logits: [B, V] next-token logits (cast to f32 here).
      rng: a PRNG key; rows draw independently.
      cfg: the sampling config (static).
      stop_ids: the stop tokens (static), needed only when ``cfg.min_new_tokens > 0``.
      allow_stop: scalar or [B] bool; False excludes the stop tokens (min_new_tokens not reached yet).
    Returns:
      tokens [B] int32, logprobs [B] f32 (sampling distribution), raw_logprobs [B] f32 (model, T=1).
    """
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
        cand, ids = candidates(masked, cfg)
        idx = jax.random.categorical(rng, cand, axis=-1).astype(jnp.int32)
        logprobs = _log_prob(cand, idx)
        tokens = idx if ids is None else _gather(ids, idx).astype(jnp.int32)
    raw_logprobs = _log_prob(logits, tokens)
    return tokens, logprobs, raw_logprobs


def candidates(logits: jax.Array, cfg: SamplingConfig) -> tuple[jax.Array, jax.Array | None]:
    """The truncated, temperature-scaled logits to draw from, in vocabulary order.

    Returns ``(cand [B, V], None)`` (``None``: candidate columns are vocabulary ids). Excluded tokens hold
    -inf, so ``softmax(cand)`` is exactly the sampling distribution. Top-k and top-p are thresholds found
    by :func:`_threshold` (eight passes over the row, no sort): top-k keeps ``z_v >= τ_k`` with ``τ_k`` the
    k-th largest value (ties at ``τ_k`` stay, as transformers' TopKLogitsWarper keeps them); top-p keeps
    ``z_v >= τ_p`` with ``τ_p`` the largest value whose upper mass ``sum_{u: z_u >= τ_p} p_u`` reaches
    ``top_p`` — i.e. token v stays iff the mass of the tokens strictly more likely than v is < ``top_p``.
    """
    scaled = logits / jnp.float32(cfg.temperature)
    vocab = scaled.shape[-1]
    top_k = 0 < cfg.top_k < vocab
    if top_k or cfg.top_p < 1.0:
        keys = _ordered_keys(scaled)
    if top_k:
        tau = kth_largest_key(keys, cfg.top_k)
        scaled = jnp.where(keys >= tau[:, None], scaled, -jnp.inf)
    if cfg.top_p < 1.0:
        # the top-k keys still order the survivors; cut tokens weigh 0 and lie below tau_k <= tau_p
        tau = _threshold(keys, jax.nn.softmax(scaled, axis=-1), jnp.float32(cfg.top_p))
        scaled = jnp.where(keys >= tau[:, None], scaled, -jnp.inf)
    if cfg.min_p > 0.0:
        threshold = jnp.max(scaled, axis=-1, keepdims=True) + jnp.float32(math.log(cfg.min_p))
        scaled = jnp.where(scaled >= threshold, scaled, -jnp.inf)
    return scaled, None


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


def kth_largest_key(keys: jax.Array, k: int, chunk: int = _CHUNK) -> jax.Array:
    """The k-th largest key per row of ``keys [B, V]`` (uint32, ``_ordered_keys``), exact, without a sort.

    Two levels, so the radix search reads ``k * chunk`` keys instead of the whole row 8 times: the row is cut
    in chunks of ``chunk`` (the tail padded with key 0, below every float's key); ``L`` = the k-th largest
    chunk maximum (:func:`_threshold` over the ``V / chunk`` maxima). ``k`` chunks are kept: every chunk whose
    maximum exceeds ``L`` (at most k - 1 of them) and the first of those whose maximum equals ``L``; the
    search runs over their keys. Exact: every key above ``L`` lies in a kept chunk, so counts of keys >= t
    agree with the whole row's for every t > L; the k kept chunks each hold a key >= L, so the count at
    ``L`` is >= k; and the true k-th largest is >= L (the k largest maxima are k keys >= L). Falls back to
    the one-level search when the row has fewer than ``2 k`` chunks.
    """
    rows, vocab = keys.shape
    n = -(-vocab // chunk)
    if n < 2 * k:
        return _threshold(keys, jnp.ones(keys.shape, jnp.float32), jnp.float32(k))
    padded = jnp.pad(keys, ((0, 0), (0, n * chunk - vocab))).reshape(rows, n, chunk)
    cmax = padded.max(axis=-1)  # [B, n]
    low = _threshold(cmax, jnp.ones(cmax.shape, jnp.float32), jnp.float32(k))  # L per row
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
    return _threshold(picked, jnp.ones(picked.shape, jnp.float32), jnp.float32(k))


def _threshold(keys: jax.Array, weights: jax.Array, target: jax.Array) -> jax.Array:
    """Per row the largest key ``t`` with ``S(t) = sum_v weights_v [keys_v >= t] >= target`` ([B] uint32).

    ``S`` is non-increasing in ``t`` (weights >= 0), so the answer is fixed bit by bit from the top: with the
    bits above ``shift`` decided (``prefix``; ``S(prefix) >= target`` holds), the next ``_RADIX_BITS`` bits
    are the largest ``j`` with ``S(prefix | j << shift) >= target`` (``j = 0`` always qualifies). Each pass
    is ONE variadic reduction over the row with 15 sums (candidates j = 1..15; S at j = 0 is never needed),
    so a row's keys and weights are read once per pass, not once per candidate; 32 / 4 = 8 passes give the
    exact key. Top-k: weights 1, target k -> the key of the k-th largest value; top-p: weights =
    probabilities, target p.
    """
    rows = keys.shape[0]
    radix = 1 << _RADIX_BITS
    digits = jnp.arange(radix, dtype=jnp.uint32)
    prefix = jnp.zeros((rows,), jnp.uint32)
    weights = weights.astype(jnp.float32)
    zero = jnp.float32(0)

    def add(a, b):
        return tuple(x + y for x, y in zip(a, b, strict=True))

    for shift in range(32 - _RADIX_BITS, -1, -_RADIX_BITS):
        cand = prefix[:, None] | (digits[None, 1:] << jnp.uint32(shift))  # [B, 15]
        terms = tuple(jnp.where(keys >= cand[:, j, None], weights, zero) for j in range(radix - 1))
        sums = jax.lax.reduce(terms, (zero,) * (radix - 1), add, (1,))  # 15 x [B]
        mass = jnp.stack([jnp.full((rows,), jnp.inf, jnp.float32), *sums], axis=1)  # [B, 16]
        ok = (mass >= target) | (digits[None, :] == 0)
        best = jnp.max(jnp.where(ok, digits[None, :], jnp.uint32(0)), axis=-1)
        prefix = prefix | (best << jnp.uint32(shift))
    return prefix


def sampling_probs(logits: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """The full [B, V] sampling distribution (for tests and diagnostics; sorts/scatters, not for the loop)."""
    logits = logits.astype(jnp.float32)
    if cfg.greedy:
        return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
    cand, ids = candidates(logits, cfg)
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
