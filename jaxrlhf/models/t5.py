"""T5 encoder-decoder (T5 v1.0, T5 v1.1 / Flan-T5, UL2 / Flan-UL2) as pure functions over plain param dicts.

Shapes: B batch, S encoder length, T decoder length, E d_model, H heads, D d_kv, V vocab, L cache slots.

    enc    = encode(input_ids [B,S], attention_mask [B,S])                            -> [B,S,E]
    hidden = decoder(decoder_input_ids [B,T], enc)  (causal self-attn, cross-attn)    -> [B,T,E]
    logits = (hidden * E**-0.5 if scale_decoder_outputs else hidden) @ head            -> [B,T,V]

with head = shared^T (tied) or lm_head. Each block is pre-norm: ``x += attn(norm(x)); x += mlp(norm(x))``.
Attention is unscaled (``softmax(q k^T + bias)``); ``bias`` comes from the first layer's relative-position
table of each stack and is shared by every layer of that stack (cross-attention has none).

Positions default to ``arange`` (as in HF, whatever the padding), so both stacks are exact for right
padding. ``positions`` / ``segment_ids`` (packing) are pairs ``(encoder_*, decoder_*)``; either may be None.
Parameter names and HF mapping: see :mod:`jaxrlhf.models._t5_params`.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from jaxrlhf.models import _t5_layers as L
from jaxrlhf.models._t5_params import (  # noqa: F401  (re-exported public API)
    HF_IGNORED_KEYS,
    hf_architecture,
    hf_tied_copies,
    hf_weight_specs,
    init_params,
    param_axes,
    spec_for_checkpoint,
)
from jaxrlhf.models._t5_params import check_spec as _check_spec
from jaxrlhf.models.layers import einsum_f32_out
from jaxrlhf.models.outputs import ForwardOutput
from jaxrlhf.models.spec import ModelSpec
from jaxrlhf.sharding import constrain

_REMAT = {
    "full": None,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _remat(fn, remat: str):
    if remat == "none":
        return fn
    if remat not in _REMAT:
        raise ValueError(f"remat must be 'none', 'full' or 'save_dots', got {remat!r}")
    return jax.checkpoint(fn, policy=_REMAT[remat])


def _pair(x: Any, name: str) -> tuple[Any, Any]:
    if x is None:
        return None, None
    if isinstance(x, (tuple, list)) and len(x) == 2:
        return x[0], x[1]
    raise ValueError(
        f"T5 forward takes {name} as a pair (encoder_{name}, decoder_{name}); got {type(x).__name__}"
    )


def _child(tree, *names):
    for n in names:
        if tree is None:
            return None
        tree = tree.get(n)
    return tree


def _bool_mask(mask: jax.Array | None, shape: tuple[int, int]) -> jax.Array:
    return jnp.ones(shape, bool) if mask is None else jnp.asarray(mask).astype(bool)


def _embed(params, ids: jax.Array, cdt) -> jax.Array:
    x = jnp.take(params["shared"]["embedding"], ids, axis=0).astype(cdt)
    return constrain(x, ("batch", "length", "act_embed"))


def _bias(spec: ModelSpec, table, q_pos, k_pos, bidirectional: bool) -> jax.Array:
    return L.position_bias(
        table,
        q_pos,
        k_pos,
        bidirectional=bidirectional,
        num_buckets=spec.relative_attention_num_buckets,
        max_distance=spec.relative_attention_max_distance,
    )


def encode(
    spec: ModelSpec,
    params: dict,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    lora: dict | None = None,
    lora_config: Any = None,
    compute_dtype=None,
    dropout_rng: jax.Array | None = None,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    attention_impl: str = "plain",
    remat: str = "none",
) -> jax.Array:
    """Encoder outputs [B,S,E] (after the final norm) for ``input_ids`` [B,S] and ``attention_mask`` [B,S].

    Bidirectional attention over real keys (mask = 1) and, with ``segment_ids`` [B,S], within a segment.
    """
    _check_spec(spec)
    cdt = compute_dtype or params["shared"]["embedding"].dtype
    b, s = input_ids.shape
    mask = _bool_mask(attention_mask, (b, s))
    pos = jnp.arange(s, dtype=jnp.int32)[None] if positions is None else jnp.asarray(positions, jnp.int32)
    enc = params["encoder"]
    bias = _bias(spec, enc["relative_attention_bias"]["embedding"], pos, pos, bidirectional=True)
    attn_mask = mask[:, None, None, :]
    if segment_ids is not None:
        seg = jnp.asarray(segment_ids)
        attn_mask = attn_mask & (seg[:, None, :, None] == seg[:, None, None, :])
    x = _embed(params, input_ids, cdt)
    elora = _child(lora, "encoder")
    for i in range(spec.num_layers):
        name = f"layers_{i}"
        fn = functools.partial(
            L.encoder_layer, spec=spec, cfg=lora_config, impl=attention_impl, path=("encoder", name)
        )
        x = _remat(fn, remat)(x, enc[name], _child(elora, name), bias, attn_mask, dropout_rng)
    return L.rms_norm(x, enc["final_norm"]["scale"], spec.norm_eps)


def forward(
    spec: ModelSpec,
    params: dict,
    input_ids: jax.Array | None,
    attention_mask: jax.Array | None = None,
    *,
    decoder_input_ids: jax.Array,
    decoder_attention_mask: jax.Array | None = None,
    encoder_outputs: jax.Array | None = None,
    lora: dict | None = None,
    lora_config: Any = None,
    cache: dict | None = None,
    compute_dtype=None,
    attention_impl: str = "plain",
    remat: str = "none",
    dropout_rng: jax.Array | None = None,
    positions: tuple | None = None,
    segment_ids: tuple | None = None,
) -> ForwardOutput:
    """Logits [B,T,V] (float32) of the decoder given the encoder input.

    Without ``cache``: the encoder runs on ``input_ids``/``attention_mask`` [B,S] unless ``encoder_outputs``
    [B,S,E] is given (``attention_mask`` is still the encoder mask); the decoder attends causally over the
    ``decoder_attention_mask`` [B,T] keys. With ``cache`` (see :func:`init_cache`): the encoder is not run;
    the T new decoder tokens are written at slots ``[index, index + T)``, attend to every valid slot at or
    before their own, and the cache comes back with ``index + T``. Relative positions use absolute positions
    (the slot numbers unless ``positions[1]`` is given), as HF does with ``past_key_values``.
    """
    _check_spec(spec)
    if decoder_input_ids is None:
        raise ValueError("T5 forward needs decoder_input_ids [B, T] (start with spec.decoder_start_token_id)")
    enc_pos, dec_pos = _pair(positions, "positions")
    enc_seg, dec_seg = _pair(segment_ids, "segment_ids")
    cdt = compute_dtype or params["shared"]["embedding"].dtype
    b, t = decoder_input_ids.shape
    dmask = _bool_mask(decoder_attention_mask, (b, t))
    dec = params["decoder"]
    table = dec["relative_attention_bias"]["embedding"]
    n_dec = spec.num_decoder_layers or spec.num_layers

    enc = encoder_outputs
    if cache is None:
        if enc is None:
            if input_ids is None:
                raise ValueError("T5 forward needs input_ids or encoder_outputs when called without a cache")
            enc = encode(
                spec,
                params,
                input_ids,
                attention_mask,
                lora=lora,
                lora_config=lora_config,
                compute_dtype=cdt,
                dropout_rng=dropout_rng,
                positions=enc_pos,
                segment_ids=enc_seg,
                attention_impl=attention_impl,
                remat=remat,
            )
        emask = _bool_mask(attention_mask, enc.shape[:2])
        enc = enc.astype(cdt)
        q_pos = jnp.arange(t, dtype=jnp.int32)[None] if dec_pos is None else jnp.asarray(dec_pos, jnp.int32)
        self_bias = _bias(spec, table, q_pos, q_pos, bidirectional=False)
        causal = jnp.tril(jnp.ones((t, t), bool))
        self_mask = dmask[:, None, None, :] & causal[None, None]
        cross_mask = emask[:, None, None, :]
        if dec_seg is not None:
            ds = jnp.asarray(dec_seg)
            self_mask = self_mask & (ds[:, None, :, None] == ds[:, None, None, :])
            if enc_seg is None:
                raise ValueError("decoder segment_ids need encoder segment_ids too: segment_ids=(enc, dec)")
            cross_mask = cross_mask & (ds[:, None, :, None] == jnp.asarray(enc_seg)[:, None, None, :])
        index, layer_caches, cross = 0, [None] * n_dec, [None] * n_dec
    else:
        if enc_seg is not None or dec_seg is not None:
            raise ValueError(
                "segment_ids (packing) are for training passes; they cannot be used with a cache"
            )
        index = cache["index"]
        slots = cache["valid"].shape[1]
        q_slot = index + jnp.arange(t, dtype=jnp.int32)
        q_pos = jnp.broadcast_to(q_slot[None] if dec_pos is None else jnp.asarray(dec_pos, jnp.int32), (b, t))
        valid = jax.lax.dynamic_update_slice(cache["valid"], dmask, (0, index))
        k_pos = jax.lax.dynamic_update_slice(cache["positions"], q_pos, (0, index))
        self_bias = _bias(spec, table, q_pos, k_pos, bidirectional=False)
        self_mask = valid[:, None, None, :] & (jnp.arange(slots)[None, :] <= q_slot[:, None])[None, None]
        cross_mask = cache["encoder_mask"][:, None, None, :]
        layer_caches = list(cache["layers"])
        cross = [(c["k"], c["v"]) for c in cache["cross"]]

    x = _embed(params, decoder_input_ids, cdt)
    dlora = _child(lora, "decoder")
    new_layers = []
    for i in range(n_dec):
        name = f"layers_{i}"
        fn = functools.partial(
            L.decoder_layer, spec=spec, cfg=lora_config, impl=attention_impl, path=("decoder", name)
        )
        x, lc = _remat(fn, remat)(
            x,
            dec[name],
            _child(dlora, name),
            self_bias,
            self_mask,
            enc,
            cross[i],
            cross_mask,
            layer_caches[i],
            index,
            dropout_rng,
        )
        new_layers.append(lc)
    hidden = L.rms_norm(x, dec["final_norm"]["scale"], spec.norm_eps)
    logits = _logits(spec, params, hidden, lora, lora_config, dropout_rng)

    new_cache = None
    if cache is not None:
        new_cache = dict(cache, layers=tuple(new_layers), valid=valid, positions=k_pos, index=index + t)
    return ForwardOutput(
        logits=logits,
        hidden=hidden,
        cache=new_cache,
        encoder_hidden=encoder_outputs if cache is not None else enc,
    )


def lm_head(spec: ModelSpec, params, hidden, *, lora=None, lora_config=None, compute_dtype=None) -> jax.Array:
    """f32 logits ``[..., V]`` of decoder ``hidden [..., E]`` (``ForwardOutput.hidden``) as in forward."""
    cdt = compute_dtype or params["shared"]["embedding"].dtype
    return _logits(spec, params, hidden.astype(cdt), lora, lora_config, None)


def lm_head_operands(
    spec: ModelSpec, params, hidden, *, compute_dtype=None, vocab_major: bool = False
) -> tuple[jax.Array, jax.Array]:
    """``(h [..., E], kernel [E, V])`` in the compute dtype, ``logits = h @ kernel`` (rescaled);
    ``vocab_major``: the kernel as ``[V, E]``."""
    cdt = compute_dtype or params["shared"]["embedding"].dtype
    h = hidden.astype(cdt)
    h = h * (spec.hidden_size**-0.5) if spec.scale_decoder_outputs else h
    if spec.tie_word_embeddings:
        w = params["shared"]["embedding"].astype(cdt)
        return h, (w if vocab_major else w.T)
    w = params["lm_head"]["kernel"].astype(cdt)
    return h, (w.T if vocab_major else w)


def _logits(spec: ModelSpec, params, hidden, lora, lora_config, rng) -> jax.Array:
    h = hidden * (spec.hidden_size**-0.5) if spec.scale_decoder_outputs else hidden
    if spec.tie_word_embeddings:
        w = params["shared"]["embedding"].astype(h.dtype)
        logits = einsum_f32_out("bte,ve->btv", h, w)
    else:
        logits = L.dense(
            h, params["lm_head"], _child(lora, "lm_head"), lora_config, L.sub_rng(rng, "lm_head")
        )
    return constrain(logits.astype(jnp.float32), ("batch", "length", "act_vocab"))


def init_cache(
    spec: ModelSpec,
    batch: int,
    max_len: int,
    dtype,
    encoder_outputs: jax.Array,
    encoder_mask: jax.Array | None,
    params: dict,
    *,
    lora: dict | None = None,
    lora_config: Any = None,
) -> dict:
    """Empty decoder self-attention cache plus each layer's cross-attention K/V of the encoder outputs.

    Returns ``{"layers": ({"k","v"}: [B,L,H,D], ...), "cross": ({"k","v"}: [B,S,H,D], ...),
    "encoder_mask": [B,S] bool, "positions": [B,L] int32, "valid": [B,L] bool, "index": int32 scalar}``.
    Pass the same ``lora`` as to :func:`forward` when cross-attention k/v projections carry adapters.
    ``max_len`` must cover every decoder token fed through the cache: like any ``dynamic_update_slice``,
    a write past the end is clamped by XLA and would overwrite the last slots.
    """
    _check_spec(spec)
    h, d = spec.num_heads, spec.head_dim
    enc = jnp.asarray(encoder_outputs)
    if enc.shape[0] != batch:
        raise ValueError(f"encoder_outputs has batch {enc.shape[0]}, cache batch is {batch}")
    emask = _bool_mask(encoder_mask, enc.shape[:2])
    cross = []
    for i in range(spec.num_decoder_layers or spec.num_layers):
        p = params["decoder"][f"layers_{i}"]["cross_attn"]
        lp = _child(lora, "decoder", f"layers_{i}", "cross_attn")
        path = ("decoder", f"layers_{i}", "cross_attn")
        k = L.project_heads(enc, p, lp, lora_config, None, "k_proj", h, path)
        v = L.project_heads(enc, p, lp, lora_config, None, "v_proj", h, path)
        cross.append({"k": k.astype(dtype), "v": v.astype(dtype)})
    empty = jnp.zeros((batch, max_len, h, d), dtype)
    return {
        "layers": tuple({"k": empty, "v": empty} for _ in cross),
        "cross": tuple(cross),
        "encoder_mask": emask,
        "positions": jnp.zeros((batch, max_len), jnp.int32),
        "valid": jnp.zeros((batch, max_len), bool),
        "index": jnp.zeros((), jnp.int32),
    }
