"""Model API: one functional entry point per operation, dispatching on the ModelSpec family.

Dispatch note: decoder-only families (llama, mistral, opt, bloom, gpt2) live in ``decoder.py``; for
``spec.model_type == "t5"`` every function here forwards to ``jaxrlhf.models.t5`` (imported lazily, so
this package imports without it): ``t5.init_params(spec, rng, dtype)``, ``t5.param_axes(spec)``,
``t5.forward(spec, params, input_ids, attention_mask, *, decoder_input_ids, decoder_attention_mask,
encoder_outputs, lora, lora_config, cache, compute_dtype, attention_impl, remat, dropout_rng)``,
``t5.hf_weight_specs(spec)``, ``t5.hf_architecture(spec)`` (and ``t5.init_cache`` when it exists).

Params are plain nested dicts (no Flax boxes); ``param_axes(spec)`` gives the same tree with tuples of
logical axis names (see ``jaxrlhf.sharding.LOGICAL_RULES``).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxrlhf import sharding
from jaxrlhf.models import decoder as _dec
from jaxrlhf.models.attention import PairLayout
from jaxrlhf.models.decoder import Decoder
from jaxrlhf.models.outputs import ForwardOutput
from jaxrlhf.models.spec import ConfigError, ModelSpec, load_hf_config

__all__ = [
    "ConfigError",
    "ForwardOutput",
    "ModelSpec",
    "PairLayout",
    "abstract_params",
    "count_params",
    "forward",
    "fuse_projections",
    "init_cache",
    "init_params",
    "jit_forward",
    "lm_head",
    "lm_head_operands",
    "lm_head_vocab_major",
    "load_hf_config",
    "load_pretrained",
    "param_axes",
    "save_pretrained",
]


def _t5():
    from jaxrlhf.models import t5

    return t5


def _decoder(spec: ModelSpec, **kw) -> Decoder:
    return Decoder(spec, **kw)


def _dummy_inputs():
    return jnp.zeros((1, 1), jnp.int32)


def _boxed_init(spec: ModelSpec, rng: jax.Array):
    return _decoder(spec).init(rng, _dummy_inputs())["params"]


def init_params(spec: ModelSpec, rng: jax.Array, dtype: Any = jnp.float32, mesh: Mesh | None = None) -> dict:
    """Random params (HF-style init, normal(0.02) kernels, unit norms) as a plain dict in ``dtype``.

    With ``mesh``, the params are created already sharded by their logical axes (jit with out_shardings).
    """
    if spec.is_encoder_decoder:
        params = _t5().init_params(spec, rng, dtype)
        return params if mesh is None else sharding.shard_params(params, param_axes(spec), mesh)

    def init(r):
        p = nn.unbox(_boxed_init(spec, r))
        return jax.tree.map(lambda x: x.astype(dtype), p)

    if mesh is None:
        return jax.jit(init)(rng)
    shardings = sharding.named_shardings(param_axes(spec), mesh, abstract_params(spec, dtype))
    return jax.jit(init, out_shardings=shardings)(rng)


def abstract_params(spec: ModelSpec, dtype: Any = jnp.float32) -> dict:
    """Tree of ``jax.ShapeDtypeStruct`` (no memory) of the params; used for sizes and sharded loading."""
    return jax.eval_shape(lambda r: init_params(spec, r, dtype), jax.random.key(0))


def param_axes(spec: ModelSpec) -> dict:
    """Same tree as the params; each leaf is a tuple of logical axis names (one per dimension)."""
    if spec.is_encoder_decoder:
        return _t5().param_axes(spec)
    boxed = jax.eval_shape(lambda r: _boxed_init(spec, r), jax.random.key(0))
    specs = nn.get_partition_spec(boxed)
    return jax.tree.map(
        lambda p: tuple(p), specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
    )


def count_params(spec: ModelSpec) -> int:
    """Number of parameters (tied embeddings counted once)."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params(spec)))


def init_cache(spec: ModelSpec, batch: int, max_len: int, dtype: Any = jnp.float32, **t5_kwargs: Any) -> dict:
    """Empty static KV cache: ``{"layers": ({"k","v": [B,S,K,D]},)*L, "positions": [B,S], "valid": [B,S],
    "index": 0}``; see docs/INTERNALS.md for how ``forward`` fills it.

    T5 also needs ``encoder_outputs=, encoder_mask=, params=`` (and ``lora=, lora_config=``): its cache holds
    each layer's cross-attention K/V (see ``jaxrlhf.models.t5.init_cache``)."""
    if spec.is_encoder_decoder:
        return _t5().init_cache(spec, batch, max_len, dtype, **t5_kwargs)
    if t5_kwargs:
        raise TypeError(f"init_cache: {sorted(t5_kwargs)} apply to encoder-decoder models only")
    kv = (batch, max_len, spec.num_kv_heads, spec.head_dim)
    return {
        "layers": tuple(
            {"k": jnp.zeros(kv, dtype), "v": jnp.zeros(kv, dtype)} for _ in range(spec.num_layers)
        ),
        "positions": jnp.zeros((batch, max_len), jnp.int32),
        "valid": jnp.zeros((batch, max_len), bool),
        "index": jnp.zeros((), jnp.int32),
    }


_FUSED = (
    ("attn", ("q_proj", "k_proj", "v_proj"), "qkv_proj"),
    ("mlp", ("gate_proj", "up_proj"), "gate_up_proj"),
)


def fuse_projections(spec: ModelSpec, params: dict) -> dict:
    """Params with each layer's q/k/v and gate/up kernels concatenated along the output axis (for decoding).

    ``layers_i/attn/{q,k,v}_proj`` become ``layers_i/attn/qkv_proj`` (kernel ``[E, H*D + 2*K*D]``, bias the
    same) and ``layers_i/mlp/{gate,up}_proj`` become ``layers_i/mlp/gate_up_proj`` (``[E, 2F]``);
    :func:`forward` accepts either tree and computes the same function: one matmul per group instead of 3 /
    two, fewer kernels per decode step. Meant inside a jitted generator (the concatenation is a copy of those
    weights); not for training trees, LoRA adapters (which address the unfused names) or tensor-parallel
    meshes (the concatenation would interleave differently sharded outputs). T5 params are returned as-is.
    """
    if spec.is_encoder_decoder:
        return params
    out = dict(params)
    for name, layer in params.items():
        if not name.startswith("layers_"):
            continue
        layer = dict(layer)
        for group, parts, fused in _FUSED:
            sub = layer.get(group)
            if sub is None or not all(p in sub for p in parts):
                continue
            sub = {k: v for k, v in sub.items() if k not in parts}
            sub[fused] = {
                leaf: jnp.concatenate([layer[group][p][leaf] for p in parts], axis=-1)
                for leaf in layer[group][parts[0]]
            }
            layer[group] = sub
        out[name] = layer
    return out


def forward(
    spec: ModelSpec,
    params: dict,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    decoder_input_ids: jax.Array | None = None,
    decoder_attention_mask: jax.Array | None = None,
    encoder_outputs: jax.Array | None = None,
    lora: dict | None = None,
    lora_config: Any = None,
    cache: dict | None = None,
    compute_dtype: Any = None,
    attention_impl: str = "plain",
    remat: str = "none",
    dropout_rng: jax.Array | None = None,
    max_segments: int | None = None,
    pair_layout: PairLayout | None = None,
) -> ForwardOutput:
    """Run the model. ``input_ids [B,T]`` int, ``attention_mask [B,T]`` (1 real, 0 pad; left or right).

    Decoder-only: positions default to ``max(cumsum(mask) - 1, 0)`` (continuing from the cache when one is
    given); ``segment_ids [B,T]`` (0 = pad) restrict attention to each packed example (pass reset
    ``positions`` too). ``lora`` mirrors the params paths of adapted Dense layers; ``lora_config.scale`` /
    ``.dropout`` apply (dropout only with ``dropout_rng``). ``compute_dtype`` (e.g. bf16) casts params and
    activations at use; logits are float32. Returns ``ForwardOutput(logits, hidden, cache, None)``.

    ``max_segments`` (decoder-only training passes, no cache): the caller promises at most that many
    segments per row — runs of one nonzero ``segment_ids`` value (or of ``attention_mask = 1`` without
    segment ids) with increasing ids and positions stepping by one inside a run, as the loaders and
    ``data.packing`` produce. The fused attention then takes lengths + offsets (cuDNN's packed layout)
    instead of a dense ``[B, 1, T, S]`` mask; logits equal the dense path's, and a row that breaks the
    promise gets NaN logits. None (default): the dense mask, exact for any mask. T5 ignores it.

    ``pair_layout`` (decoder-only, no cache, no segment ids): the rows are shared-prefix pairs
    ``[prefix | continuation 1 | continuation 2 | pad]`` (:class:`~jaxrlhf.models.attention.PairLayout`,
    e.g. DPO's prompt with its chosen and rejected responses). It sets the attention mask and the positions
    (``attention_mask`` is ignored): every token's output equals what the row ``[prefix, its
    continuation]`` would give on its own, with the prefix computed once.
    """
    if lora:
        from jaxrlhf.lora import check_adapters

        check_adapters(params, lora)  # a mis-nested tree would silently run the base model
    if pair_layout is not None and spec.is_encoder_decoder:
        raise ValueError("pair_layout applies to decoder-only models")
    if spec.is_encoder_decoder:
        return _t5().forward(
            spec,
            params,
            input_ids,
            attention_mask,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            encoder_outputs=encoder_outputs,
            lora=lora,
            lora_config=lora_config,
            cache=cache,
            compute_dtype=compute_dtype,
            attention_impl=attention_impl,
            remat=remat,
            dropout_rng=dropout_rng,
            positions=positions,  # T5: pairs (encoder_*, decoder_*)
            segment_ids=segment_ids,
        )
    if decoder_input_ids is not None or encoder_outputs is not None:
        raise ValueError(
            f"{spec.model_type} is decoder-only: decoder_input_ids / encoder_outputs do not apply"
        )
    model = _decoder(
        spec,
        compute_dtype=compute_dtype,
        lora_config=lora_config,
        impl=attention_impl,
        remat=remat,
        max_segments=max_segments,
    )
    variables = {"params": params}
    if lora:
        variables["lora"] = lora
    rngs = {"dropout": dropout_rng} if dropout_rng is not None else None
    logits, hidden, new_cache = model.apply(
        variables, input_ids, attention_mask, positions, segment_ids, cache, pair_layout, rngs=rngs
    )
    return ForwardOutput(logits, hidden, new_cache, None)


def lm_head(
    spec: ModelSpec,
    params: dict,
    hidden: jax.Array,
    *,
    lora: dict | None = None,
    lora_config: Any = None,
    compute_dtype: Any = None,
) -> jax.Array:
    """The LM head alone: f32 logits ``[..., V]`` of ``hidden [..., E]`` = ``ForwardOutput.hidden``.

    ``lm_head(spec, params, forward(...).hidden, compute_dtype=c) == forward(..., compute_dtype=c).logits``
    for every family: tied (``hidden @ embedding.T``) or untied (``hidden @ lm_head.kernel``); OPT's
    ``project_out`` is already in ``hidden``; T5 rescales by ``E**-0.5`` when ``scale_decoder_outputs``.
    Lets callers apply the head only where it is needed (e.g. log-probs at completion positions only).
    ``lora`` applies to a T5 untied ``lm_head`` adapter (decoder-only heads take no adapter, as in forward).
    """
    if spec.is_encoder_decoder:
        return _t5().lm_head(
            spec, params, hidden, lora=lora, lora_config=lora_config, compute_dtype=compute_dtype
        )
    logits = _dec.lm_head(spec, params, hidden, compute_dtype)
    return sharding.constrain(logits, ("batch", "length", "act_vocab")[-logits.ndim :])


def lm_head_vocab_major(spec: ModelSpec) -> bool:
    """Whether the LM head's weight is stored ``[V, E]`` (a tied embedding): pass it as ``vocab_major`` to
    :func:`lm_head_operands` and the chunked losses, so the kernel is used as stored (no transposed copy)."""
    return bool(spec.tie_word_embeddings)


def lm_head_operands(
    spec: ModelSpec, params: dict, hidden: jax.Array, *, compute_dtype: Any = None, vocab_major: bool = False
) -> tuple[jax.Array, jax.Array]:
    """``(h [..., E], kernel [E, V])`` in the compute dtype with ``lm_head(...) ~= h @ kernel`` (f32 acc.).

    The operands of the chunked losses (``losses.chunked_token_logprobs`` / ``chunked_sft_loss``), which never
    build the ``[B, T, V]`` logits. T5 rescaling is folded into ``h``; a tied kernel is the embedding
    transposed. Exact for every head except T5's untied head in bf16 (there forward rounds logits to bf16).
    ``vocab_major``: the kernel as ``[V, E]`` (``lm_head(...) ~= h @ kernel.T``; :func:`lm_head_vocab_major`).
    """
    if spec.is_encoder_decoder:
        return _t5().lm_head_operands(
            spec, params, hidden, compute_dtype=compute_dtype, vocab_major=vocab_major
        )
    return _dec.lm_head_operands(spec, params, hidden, compute_dtype, vocab_major)


def jit_forward(spec: ModelSpec, mesh: Mesh, **forward_kwargs: Any):
    """``f(params, input_ids, attention_mask) -> ForwardOutput`` jitted with explicit shardings on ``mesh``.

    Params are sharded by :func:`param_axes`, inputs and outputs along ``batch`` (data x fsdp); the trace
    runs under ``jax.set_mesh(mesh)`` so activation constraints (``sharding.constrain``) apply.
    """
    abstract = abstract_params(spec)
    p_shard = sharding.named_shardings(param_axes(spec), mesh, abstract)
    b2, b3 = sharding.batch_sharding(mesh, 2), sharding.batch_sharding(mesh, 3)

    def f(params, input_ids, attention_mask):
        return forward(spec, params, input_ids, attention_mask, **forward_kwargs)

    out_shard = ForwardOutput(b3, b3, None, None)
    jitted = jax.jit(f, in_shardings=(p_shard, b2, b2), out_shardings=out_shard)

    def call(params, input_ids, attention_mask):
        with sharding.use_mesh(mesh):
            return jitted(params, input_ids, attention_mask)

    return call


from jaxrlhf.models.hf_io import load_pretrained, save_pretrained  # noqa: E402
