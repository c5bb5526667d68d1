"""The rollout engine: jitted prefill + ``lax.while_loop`` decode over a static KV cache.

``generate(spec, params, prompt_ids, prompt_mask, rng, SamplingConfig(...))`` is one jitted computation:

  1. prompts are left-aligned (any padding layout in, left padding out), repeated ``n`` times, and the
     prompt width is padded on the left to a bucket (:func:`bucket_length`), so a run compiles few shapes;
  2. prefill: decoder-only models write the KV cache of all prompt tokens but the last in one forward call
     (its logits are never materialised); T5 runs its encoder once and caches the cross-attention K/V;
  3. decode: a ``lax.while_loop`` over a state struct feeds one token per row (the last prompt token, or
     T5's decoder start token, then each sampled token), samples the next one (:mod:`jaxrlhf._sampling`)
     and writes it into a static ``[B, N_bucket]`` buffer, while ``step < max_new_tokens & ~all(done)``.
     The cache ``[B, S, K, D]`` is updated in place by ``dynamic_update_slice`` inside the model.

Positions of generated tokens continue the prompt's ``cumsum(mask) - 1``, so a training forward pass over
``prompt ++ completion`` (:meth:`GenerateResult.sequences`) reproduces ``raw_logprobs`` exactly.

Generation length is bucketed too: the buffer holds ``bucket_length(max_new_tokens)`` slots while the loop
bound is a traced scalar, so ``max_new_tokens`` 100 and 120 share one executable.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from jaxrlhf import sharding
from jaxrlhf._sampling import (
    DecodeState,
    SamplingConfig,
    StepFn,
    candidates,
    decode_loop,
    sample,
    sampling_probs,
)
from jaxrlhf.models.spec import ModelSpec

__all__ = [
    "DecodeState",
    "GenerateResult",
    "SamplingConfig",
    "bucket_length",
    "candidates",
    "decode_loop",
    "generate",
    "sample",
    "sampling_probs",
    "stream",
]


def bucket_length(n: int, minimum: int = 8) -> int:
    """Round a length up to a compile bucket: powers of two up to 1024, then multiples of 512."""
    if n <= 1024:
        return max(minimum, 1 << max(0, int(n - 1).bit_length()))
    return -(-n // 512) * 512


class GenerateResult(NamedTuple):
    """What :func:`generate` returns. R = batch * n rows (row ``b*n + i`` is sample ``i`` of prompt ``b``).

    tokens:       [R, N] int32 generated tokens; ``pad_token_id`` after a row stopped.
    mask:         [R, N] bool, True for valid tokens: up to and including the first stop token.
    logprobs:     [R, N] f32 log-prob of each token under the distribution it was drawn from (0 if masked).
    raw_logprobs: [R, N] f32 ``log_softmax(logits)[token]`` of the model at temperature 1, untruncated:
                  what a training forward pass over :meth:`sequences` recomputes (0 where masked).
    lengths:      [R] int32 number of valid tokens.
    prompt_ids:   [R, P] the prompts as fed to the model (left-aligned, P = the prompt bucket).
    prompt_mask:  [R, P] their mask.
    """

    tokens: jax.Array
    mask: jax.Array
    logprobs: jax.Array
    raw_logprobs: jax.Array
    lengths: jax.Array
    prompt_ids: jax.Array
    prompt_mask: jax.Array

    def sequences(self) -> tuple[jax.Array, jax.Array]:
        """Decoder-only: ``(ids [R, P+N], mask [R, P+N])`` = prompt ++ completion, for a training forward.

        ``models.forward(spec, params, ids, mask).logits[:, P-1:-1]`` scores the completion tokens.
        """
        ids = jnp.concatenate([self.prompt_ids, self.tokens], axis=1)
        mask = jnp.concatenate([self.prompt_mask.astype(bool), self.mask], axis=1)
        return ids, mask

    def decoder_input_ids(self, start_token_id: int) -> jax.Array:
        """T5: ``[R, N]`` decoder inputs ``[start] ++ tokens[:-1]`` whose forward logits score ``tokens``.

        ``models.forward(spec, params, prompt_ids, prompt_mask, decoder_input_ids=...)`` reproduces
        ``raw_logprobs`` at the ``mask`` positions.
        """
        start = jnp.full((self.tokens.shape[0], 1), start_token_id, self.tokens.dtype)
        return jnp.concatenate([start, self.tokens[:, :-1]], axis=1)


# ---------------------------------------------------------------------------------------------- model glue


@dataclasses.dataclass(frozen=True)
class _Model:
    """Static model options of one generator (hashable: part of the jit cache key)."""

    spec: ModelSpec
    lora_config: Any = None
    compute_dtype: Any = None
    cache_dtype: Any = None
    attention_impl: str = "plain"
    mesh: Mesh | None = None
    fuse: bool = False  # decode with q/k/v and gate/up kernels concatenated (models.fuse_projections)
    live_rows: int = 0  # > 0: rows from this index on are padding (done from the start, see _extra_rows)
    kv_segments: int = 1  # decoder-only: decode in this many phases over a growing cache (_segment_ends)


def _fuse_default(lora: Any, mesh: Mesh | None, fuse: bool | None) -> bool:
    """Fuse unless adapters address the unfused names or a tensor axis shards the projection outputs."""
    if fuse is not None:
        return bool(fuse) and lora is None
    return lora is None and (mesh is None or dict(mesh.shape).get("tensor", 1) == 1)


def _constrain(x: jax.Array, names: tuple, mesh: Mesh | None) -> jax.Array:
    if mesh is None or mesh.size == 1:
        return x
    spec = sharding.logical_to_spec(names, mesh, x.shape)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _constrain_cache(cache: Any, mesh: Mesh | None) -> Any:
    """KV caches [B, S, K, D] over (batch, -, kv heads, -); everything else batch-major or replicated."""

    def one(x):
        if x.ndim == 4:
            return _constrain(x, ("batch", "cache_length", "act_kv_heads", None), mesh)
        if x.ndim >= 1:
            return _constrain(x, ("batch",) + (None,) * (x.ndim - 1), mesh)
        return x

    return jax.tree.map(one, cache)


def _forward_kw(m: _Model, lora: Any) -> dict:
    return dict(
        lora=lora, lora_config=m.lora_config, compute_dtype=m.compute_dtype, attention_impl=m.attention_impl
    )


def _make_step_fn(m: _Model, params: Any, lora: Any) -> StepFn:
    from jaxrlhf import models

    def step_fn(cache, tokens, positions):
        ids = tokens[:, None]
        ones = jnp.ones_like(ids, dtype=jnp.int32)
        if m.spec.is_encoder_decoder:
            out = models.forward(
                m.spec, params, None, None, decoder_input_ids=ids, decoder_attention_mask=ones, cache=cache,
                **_forward_kw(m, lora),
            )  # fmt: skip
        else:
            out = models.forward(
                m.spec, params, ids, ones, positions=positions[:, None], cache=cache, **_forward_kw(m, lora)
            )
        return out.logits[:, -1].astype(jnp.float32), _constrain_cache(out.cache, m.mesh)

    return step_fn


def _cache_dtype(m: _Model, params: Any):
    if m.cache_dtype is not None:
        return m.cache_dtype
    if m.compute_dtype is not None:
        return m.compute_dtype
    return max(jax.tree.leaves(params), key=lambda x: x.size).dtype  # the embedding / largest kernel


def _left_align(ids: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Roll each row right so its last real token sits in the last column (right/left padding -> left)."""
    width = ids.shape[1]
    col = jnp.arange(width)
    last = jnp.max(jnp.where(mask, col[None, :], -1), axis=1)
    src = (col[None, :] - ((width - 1) - last)[:, None]) % width
    return jnp.take_along_axis(ids, src, axis=1), jnp.take_along_axis(mask, src, axis=1)


def _prefill(m: _Model, params, ids, mask, rng, lora, cfg: SamplingConfig) -> tuple[DecodeState, tuple]:
    """Left-align, repeat n times, fill the cache: ``(state before the first decode step, (ids, mask))``."""
    from jaxrlhf import models

    ids, mask = _left_align(ids.astype(jnp.int32), mask.astype(bool))
    if cfg.n > 1:
        ids, mask = jnp.repeat(ids, cfg.n, axis=0), jnp.repeat(mask, cfg.n, axis=0)
    batch, width = ids.shape
    ids = _constrain(ids, ("batch", None), m.mesh)
    mask = _constrain(mask, ("batch", None), m.mesh)
    n_buf = cfg.max_new_tokens
    dtype = _cache_dtype(m, params)
    if m.spec.is_encoder_decoder:
        from jaxrlhf.models import t5

        lkw = dict(lora=lora, lora_config=m.lora_config)
        enc = t5.encode(
            m.spec, params, ids, mask, compute_dtype=m.compute_dtype, attention_impl=m.attention_impl, **lkw
        )
        cache = t5.init_cache(m.spec, batch, n_buf, dtype, enc, mask, params, **lkw)
        start = m.spec.decoder_start_token_id or 0
        next_token = jnp.full((batch,), start, jnp.int32)
        next_pos = jnp.zeros((batch,), jnp.int32)
    else:
        positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
        slots = width + _segment_ends(n_buf, m.kv_segments)[0]
        cache = _constrain_cache(models.init_cache(m.spec, batch, slots, dtype), m.mesh)
        if width > 1:
            out = models.forward(
                m.spec, params, ids[:, :-1], mask[:, :-1].astype(jnp.int32), positions=positions[:, :-1],
                cache=cache, **_forward_kw(m, lora),
            )  # fmt: skip
            cache = out.cache  # logits of the prefill are unused: XLA drops the LM head here
        next_token, next_pos = ids[:, -1], positions[:, -1]
    cache = _constrain_cache(cache, m.mesh)
    buf = lambda dt: _constrain(jnp.zeros((batch, n_buf), dt), ("batch", None), m.mesh)
    state = DecodeState(
        step=jnp.zeros((), jnp.int32),
        cache=cache,
        next_token=next_token,
        next_pos=next_pos,
        tokens=buf(jnp.int32) + jnp.int32(cfg.pad_token_id),
        logprobs=buf(jnp.float32),
        raw_logprobs=buf(jnp.float32),
        done=jnp.arange(batch) >= m.live_rows if m.live_rows else jnp.zeros((batch,), bool),
        lengths=jnp.zeros((batch,), jnp.int32),
        rng=rng,
    )
    return state, (ids, mask)


def _result(state: DecodeState, ids, mask) -> GenerateResult:
    valid = jnp.arange(state.tokens.shape[1])[None, :] < state.lengths[:, None]
    return GenerateResult(state.tokens, valid, state.logprobs, state.raw_logprobs, state.lengths, ids, mask)


@functools.partial(jax.jit, static_argnames=("m", "cfg"))
def _generate_jit(m: _Model, cfg: SamplingConfig, params, ids, mask, rng, max_new, lora) -> GenerateResult:
    params, lora = _maybe_fuse(m, params), _cast_matrices(m, lora)
    state, (ids, mask) = _prefill(m, params, ids, mask, rng, lora, cfg)
    step_fn = _make_step_fn(m, params, lora)
    for i, end in enumerate(_segment_ends(cfg.max_new_tokens, m.kv_segments)):
        if i:
            state = state._replace(cache=_grow_cache(state.cache, ids.shape[1] + end, m.mesh))
        state = decode_loop(step_fn, state, cfg, max_new, jnp.int32(end))
    return _result(state, ids, mask)


def _segment_ends(n_buf: int, segments: int) -> tuple[int, ...]:
    """Step bounds of the decode phases: ``segments`` equal parts of the ``n_buf`` generation slots.

    Phase ``i`` runs over a cache of ``prompt + ends[i]`` slots, so early steps do not read the empty tail
    of the static cache (attention reads every slot of its cache each step); between phases the cache is
    copied into a larger one (:func:`_grow_cache`). One phase = one cache of ``prompt + n_buf`` slots.
    """
    segments = max(1, min(segments, n_buf))
    return tuple(-(-n_buf * (i + 1) // segments) for i in range(segments))


def _grow_cache(cache: dict, slots: int, mesh: Mesh | None) -> dict:
    """A decoder-only cache padded to ``slots`` slots (empty: invalid, position 0); same contents."""
    pad = lambda x: jnp.pad(x, [(0, 0), (0, slots - x.shape[1])] + [(0, 0)] * (x.ndim - 2))
    grown = dict(cache)
    grown["layers"] = tuple({k: pad(v) for k, v in layer.items()} for layer in cache["layers"])
    grown["positions"], grown["valid"] = pad(cache["positions"]), pad(cache["valid"])
    return _constrain_cache(grown, mesh)


def _kv_segments(spec: ModelSpec, cfg: SamplingConfig, segments: int | None) -> int:
    """Default: 4 phases when decoder-only and the (bucketed) generation is at least 256 tokens long."""
    if spec.is_encoder_decoder:
        return 1
    if segments is None:
        return 4 if cfg.max_new_tokens >= 256 else 1
    if segments < 1:
        raise ValueError(f"kv_segments must be >= 1, got {segments}")
    return int(segments)


@functools.partial(jax.jit, static_argnames=("m", "cfg"))
def _prefill_jit(m: _Model, cfg: SamplingConfig, params, ids, mask, rng, lora):
    params, lora = _maybe_fuse(m, params), _cast_matrices(m, lora)
    return _prefill(m, params, ids, mask, rng, lora, cfg)


@functools.partial(jax.jit, static_argnames=("m", "cfg"), donate_argnames=("state",))
def _decode_jit(
    m: _Model, cfg: SamplingConfig, params, state: DecodeState, max_new, until, lora
) -> DecodeState:
    step_fn = _make_step_fn(m, _maybe_fuse(m, params), _cast_matrices(m, lora))
    return decode_loop(step_fn, state, cfg, max_new, until)


def _mesh_context(mesh: Mesh | None):
    """``sharding.use_mesh(mesh)``, or a no-op context without a mesh."""
    import contextlib

    return sharding.use_mesh(mesh) if mesh is not None else contextlib.nullcontext()


def _maybe_fuse(m: _Model, params: Any) -> Any:
    """The decode-time weights: matrices cast to the compute dtype once (:func:`_cast_matrices`), then
    q/k/v and gate/up concatenated when ``m.fuse``."""
    params = _cast_matrices(m, params)
    if not m.fuse:
        return params
    from jaxrlhf import models

    return models.fuse_projections(m.spec, params)


def _cast_matrices(m: _Model, tree: Any) -> Any:
    """Kernels, embeddings and LoRA factors (floating leaves of rank >= 2) cast to ``m.compute_dtype``
    before the decode loop, so each step reads e.g. bf16 weights instead of converting f32 master weights
    again (the forward casts them at use, so the values are the same). Decoder-only models: T5's relative
    position bias table is not cast at use, so encoder-decoder weights are left as they are."""
    cdt = m.compute_dtype
    if cdt is None or tree is None or m.spec.is_encoder_decoder:
        return tree

    def cast(x):
        ok = jnp.issubdtype(x.dtype, jnp.floating) and x.ndim >= 2 and jnp.dtype(x.dtype).itemsize > 2
        return x.astype(cdt) if ok and jnp.dtype(cdt).itemsize < jnp.dtype(x.dtype).itemsize else x

    return jax.tree.map(cast, tree)


# ---------------------------------------------------------------------------------------------- public API


def _resolve(spec: ModelSpec, cfg: SamplingConfig) -> SamplingConfig:
    """Fill model defaults (stop tokens, pad) and bucket the buffer length: the static config of the jit."""
    stop = cfg.stop_token_ids if cfg.stop_token_ids is not None else tuple(spec.eos_token_ids)
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else (spec.pad_token_id or 0)
    return dataclasses.replace(
        cfg, max_new_tokens=bucket_length(cfg.max_new_tokens), stop_token_ids=tuple(stop), pad_token_id=pad
    )


def _check_rng(rng: jax.Array | None, cfg: SamplingConfig) -> jax.Array:
    if rng is None:
        if not cfg.greedy:
            raise ValueError("generate: rng=None is only allowed for greedy decoding (temperature=0.0)")
        return jax.random.key(0)
    return rng


def _prepare(spec: ModelSpec, prompt_ids, prompt_mask, cfg: SamplingConfig):
    """Check the prompts, pad their width on the left to its bucket, resolve the static config."""
    if np.ndim(prompt_ids) != 2:
        raise ValueError(f"prompt_ids must be [batch, length], got shape {np.shape(prompt_ids)}")
    if prompt_mask is None:
        prompt_mask = np.ones(np.shape(prompt_ids), np.int32)
    if np.shape(prompt_mask) != np.shape(prompt_ids):
        raise ValueError(
            f"prompt_mask shape {np.shape(prompt_mask)} != prompt_ids shape {np.shape(prompt_ids)}"
        )
    width = np.shape(prompt_ids)[1]
    longest = width
    if not isinstance(prompt_mask, jax.Array) or prompt_mask.is_fully_addressable:
        lengths = np.asarray(prompt_mask).astype(bool).sum(axis=1)
        empty = np.nonzero(lengths == 0)[0]
        if empty.size:
            raise ValueError(f"prompt rows {empty.tolist()[:8]} have no tokens (prompt_mask is all zero)")
        longest = int(lengths.max())
    if spec.position_type == "learned" and longest + cfg.max_new_tokens > spec.max_position_embeddings:
        raise ValueError(
            f"prompt length {longest} + max_new_tokens {cfg.max_new_tokens} exceeds the model's "
            f"{spec.max_position_embeddings} learned positions"
        )
    pad = bucket_length(width) - width
    if pad:
        xp = jnp if isinstance(prompt_ids, jax.Array) else np
        prompt_ids = xp.pad(prompt_ids, ((0, 0), (pad, 0)))
        prompt_mask = xp.pad(prompt_mask, ((0, 0), (pad, 0)))
    return _resolve(spec, cfg), prompt_ids, prompt_mask


# Fewest rows a decode step runs with, by platform. XLA:GPU rewrites a matmul whose activation side is one
# row (batch 1, one token) and whose weight has < 10M elements into multiply + reduce ("dot strength
# reduction"), and does not fuse the two: the [in, out] product is written and read back, 3x the weight
# bytes (the 1.24B model's q/k/v and o projections: 0.4 of a 1.47 ms step on an H200). A single-row batch is
# therefore decoded as two identical rows and the second is dropped; the weights are still read once.
_MIN_DECODE_ROWS = {"gpu": 2}


def _extra_rows(rows: int, mesh: Mesh | None) -> int:
    platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
    return max(0, _MIN_DECODE_ROWS.get(platform, 1) - rows)


def _add_rows(ids, mask, extra: int):
    """Append ``extra`` copies of the last prompt row (their outputs are dropped by the caller)."""
    if not extra:
        return ids, mask
    xp = jnp if isinstance(ids, jax.Array) else np
    rep = lambda a: xp.concatenate([a] + [a[-1:]] * extra, axis=0)
    return rep(ids), rep(mask)


def _setup(
    spec, prompt_ids, prompt_mask, cfg, lora, lora_config, compute_dtype, cache_dtype, impl, mesh, fuse,
    kv_segments=None,
):  # fmt: skip
    """Static model options, resolved config, padded prompts and the number of real output rows."""
    fuse = _fuse_default(lora, mesh, fuse)
    rcfg, ids, mask = _prepare(spec, prompt_ids, prompt_mask, cfg)
    rows = ids.shape[0] * cfg.n
    extra = _extra_rows(rows, mesh)
    ids, mask = _add_rows(ids, mask, extra)
    segments = _kv_segments(spec, rcfg, kv_segments)
    m = _Model(
        spec, lora_config, compute_dtype, cache_dtype, impl, mesh, fuse, rows if extra else 0, segments
    )
    return m, rcfg, ids, mask, rows


def generate(
    spec: ModelSpec,
    params: Any,
    prompt_ids: jax.Array,
    prompt_mask: jax.Array | None,
    rng: jax.Array,
    cfg: SamplingConfig,
    *,
    lora: Any = None,
    lora_config: Any = None,
    compute_dtype: Any = None,
    cache_dtype: Any = None,
    attention_impl: str = "plain",
    mesh: Mesh | None = None,
    fuse_projections: bool | None = None,
    kv_segments: int | None = None,
) -> GenerateResult:
    """Sample ``cfg.max_new_tokens`` tokens after each prompt; see the module docstring and GenerateResult.

    Args:
      spec, params: the model (params may be sharded over ``mesh``).
      prompt_ids: [B, P] int token ids, padded left or right; prompt_mask: [B, P] (1 = token) or None.
      rng: a PRNG key (may be None when greedy).
      cfg: SamplingConfig (``temperature=0.0`` is greedy).
      lora, lora_config: generate with adapters (PPO's policy); ``lora=None`` is the base model.
      compute_dtype: activation dtype of the forward (e.g. bf16); logits and sampling stay f32.
      cache_dtype: KV-cache dtype (default: compute_dtype, else the params' dtype).
      mesh: when given, the cache and buffers are sharded batch over (data, fsdp), KV heads over tensor.
      fuse_projections: decode with q/k/v and gate/up kernels concatenated (one matmul each; the jitted
        call holds a fused copy of those weights). ``None`` = on unless ``lora`` is given or the mesh has
        a tensor axis > 1.
      kv_segments: decoder-only: decode in this many phases, phase ``i`` over a cache of ``prompt +
        (i+1)/k * max_new_tokens`` slots (the cache is copied into a larger one between phases), so early
        steps skip the empty cache tail. ``None`` = 4 when the bucketed ``max_new_tokens`` >= 256, else 1.
        More phases compile more loop bodies, and during each copy the old and the new cache are both
        live (peak KV memory up to about 1.75x the final cache with 4 phases; pass 1 when that matters).
        Results are the same up to float rounding of the attention sums over the different cache lengths.
    Returns:
      GenerateResult with R = B * cfg.n rows and N = cfg.max_new_tokens columns.
    """
    m, rcfg, ids, mask, rows = _setup(
        spec, prompt_ids, prompt_mask, cfg, lora, lora_config, compute_dtype, cache_dtype, attention_impl,
        mesh, fuse_projections, kv_segments,
    )  # fmt: skip
    rng = _check_rng(rng, cfg)
    with _mesh_context(mesh):  # the model's activation constraints apply under the mesh
        out = _generate_jit(m, rcfg, params, ids, mask, rng, jnp.int32(cfg.max_new_tokens), lora)
    n = cfg.max_new_tokens
    if n == rcfg.max_new_tokens and rows == out.tokens.shape[0]:
        return out
    return GenerateResult(
        tokens=out.tokens[:rows, :n],
        mask=out.mask[:rows, :n],
        logprobs=out.logprobs[:rows, :n],
        raw_logprobs=out.raw_logprobs[:rows, :n],
        lengths=out.lengths[:rows],
        prompt_ids=out.prompt_ids[:rows],
        prompt_mask=out.prompt_mask[:rows],
    )


def stream(
    spec: ModelSpec,
    params: Any,
    prompt_ids: jax.Array,
    prompt_mask: jax.Array | None,
    rng: jax.Array,
    cfg: SamplingConfig,
    *,
    chunk: int = 8,
    lora: Any = None,
    lora_config: Any = None,
    compute_dtype: Any = None,
    cache_dtype: Any = None,
    attention_impl: str = "plain",
    mesh: Mesh | None = None,
    fuse_projections: bool | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Like :func:`generate` but yields ``(tokens [R, k], mask [R, k])`` numpy chunks as they are decoded.

    Prefill is one jitted call and decoding runs ``chunk`` steps per call of one jitted loop whose state is
    donated (updated in place); the draws equal :func:`generate`'s for the same rng (``generate`` with
    ``kv_segments=1``; stream always decodes over one cache size).
    """
    m, rcfg, ids, mask, rows = _setup(
        spec, prompt_ids, prompt_mask, cfg, lora, lora_config, compute_dtype, cache_dtype, attention_impl,
        mesh, fuse_projections, kv_segments=1,  # chunks share one donated state: one cache size
    )  # fmt: skip
    rng = _check_rng(rng, cfg)
    with _mesh_context(mesh):
        state, _ = _prefill_jit(m, rcfg, params, ids, mask, rng, lora)
    max_new, done_steps = jnp.int32(cfg.max_new_tokens), 0
    while done_steps < cfg.max_new_tokens:
        until = min(done_steps + chunk, cfg.max_new_tokens)
        with _mesh_context(mesh):
            state = _decode_jit(m, rcfg, params, state, max_new, jnp.int32(until), lora)
        step = int(state.step)
        lengths = np.asarray(state.lengths)[:rows]
        tokens = np.asarray(state.tokens)[:rows, done_steps:step]
        valid = np.arange(done_steps, step)[None, :] < lengths[:, None]
        yield tokens, valid
        if step < until:  # every row stopped
            return
        done_steps = step
