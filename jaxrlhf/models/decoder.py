"""One decoder-only transformer whose options cover Llama 2/3, Mistral, OPT, BLOOM and GPT-2.

Param tree (docs/INTERNALS.md): ``embed_tokens``, ``embed_positions``, ``embed_norm``, ``project_in``,
``layers_{i}/{input_norm, attn/{q,k,v,o}_proj, post_attn_norm, mlp/{gate,up,down}_proj}``, ``final_norm``,
``project_out``, ``lm_head`` (absent when tied).

A layer is, with pre-norm (Llama, GPT-2, BLOOM, OPT pre-LN)::

    h = x + attn(norm1(x));  out = h + mlp(norm2(h))

with post-norm (OPT-350m, ``pre_norm=False``)::

    h = norm1(x + attn(x));  out = norm2(h + mlp(h))

and with BLOOM's ``residual_post_norm`` the residual branches start from the normed input instead.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxrlhf.models.attention import (
    Attention,
    SegmentLayout,
    make_mask,
    resolve_attention_impl,
    segment_layout,
)
from jaxrlhf.models.layers import (
    Dense,
    Embed,
    Norm,
    activation,
    alibi_slopes,
    einsum_f32_out,
    rope_inv_freq,
    rope_tables,
)
from jaxrlhf.models.spec import ModelSpec
from jaxrlhf.sharding import constrain

ACT = ("batch", "length", "act_embed")

_REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole layer in the backward pass
    "save_dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def _mlp_tail(down: nn.Module, act: str, gate: jax.Array | None, up: jax.Array) -> jax.Array:
    """``down(act(gate) * up)`` (gated) or ``down(act(up))``: [..., I] -> [..., E]."""
    h = activation(act, up) if gate is None else activation(act, gate) * up
    return down(constrain(h, ("batch", "length", "act_mlp")))


# The activation product is recomputed in the backward pass from the projections' outputs (the region's
# inputs, saved anyway) instead of being saved: the down projection's weight (or LoRA A) gradient needs
# ``h = act(gate) * up``, and without this XLA keeps h next to gate and up under LoRA (a third
# [tokens, intermediate] tensor per layer: 4 GiB of the Llama-3.2-1B LoRA step at 8 x 2048), as Liger's
# SwiGLU kernel recomputes it. Elementwise only: the down projection's matmul is not needed by its own
# backward and is not rerun. Forward-only calls (generation, scoring) are unaffected.
_checkpointed_tail = nn.remat(_mlp_tail, static_argnums=(1,))


class MLP(nn.Module):
    spec: ModelSpec
    compute_dtype: Any = None
    lora_config: Any = None

    @nn.compact
    def __call__(self, x):
        s = self.spec
        kw = dict(use_bias=s.mlp_bias, compute_dtype=self.compute_dtype, lora_config=self.lora_config)
        gate = None
        if s.gated_mlp and self.has_variable("params", "gate_up_proj"):  # models.fuse_projections
            gate_up = Dense(2 * s.intermediate_size, ("embed", "mlp"), name="gate_up_proj", **kw)(x)
            gate, up = jnp.split(gate_up, 2, axis=-1)
        else:
            up = Dense(s.intermediate_size, ("embed", "mlp"), name="up_proj", **kw)(x)
            if s.gated_mlp:
                gate = Dense(s.intermediate_size, ("embed", "mlp"), name="gate_proj", **kw)(x)
        down = Dense(x.shape[-1], ("mlp", "embed"), name="down_proj", **kw)
        return _checkpointed_tail(down, s.activation, gate, up)


class Block(nn.Module):
    spec: ModelSpec
    compute_dtype: Any = None
    lora_config: Any = None
    impl: str = "plain"

    @nn.compact
    def __call__(self, x, mask, bias, rope, cache, index, is_causal: bool = False):
        s = self.spec
        norm1 = Norm(s.norm_type, s.norm_eps, name="input_norm")
        norm2 = Norm(s.norm_type, s.norm_eps, name="post_attn_norm")
        attn = Attention(
            s.num_heads,
            s.num_kv_heads,
            s.head_dim,
            use_bias=s.attention_bias,
            compute_dtype=self.compute_dtype,
            lora_config=self.lora_config,
            impl=self.impl,
            window=s.sliding_window,
            name="attn",
        )
        mlp = MLP(s, self.compute_dtype, self.lora_config, name="mlp")
        if s.pre_norm:
            hn = norm1(x)
            a, new_cache = attn(hn, mask, bias, rope, cache, index, is_causal)
            h = (hn if s.residual_post_norm else x) + a.astype(x.dtype)
            hn2 = norm2(h)
            out = (hn2 if s.residual_post_norm else h) + mlp(hn2).astype(x.dtype)
        else:
            a, new_cache = attn(x, mask, bias, rope, cache, index, is_causal)
            h = norm1(x + a.astype(x.dtype))
            out = norm2(h + mlp(h).astype(x.dtype))
        return constrain(out, ACT), new_cache


class Decoder(nn.Module):
    """Returns ``(logits [B,T,V] f32, hidden [B,T,E_out], new_cache)``; see :func:`jaxrlhf.models.forward`."""

    spec: ModelSpec
    compute_dtype: Any = None
    lora_config: Any = None
    impl: str = "plain"
    remat: str = "none"
    max_segments: int | None = None

    @nn.compact
    def __call__(
        self, input_ids, attention_mask=None, positions=None, segment_ids=None, cache=None, pairs=None
    ):
        s = self.spec
        b, t = input_ids.shape
        impl = resolve_attention_impl(self.impl, self.compute_dtype or jnp.float32)
        if pairs is not None:  # shared-prefix pair rows: the layout gives the mask and the positions
            if cache is not None or segment_ids is not None:
                raise ValueError("pair_layout does not combine with a KV cache or segment_ids")
            attention_mask = (pairs.part(t) >= 0).astype(jnp.int32)
            positions = pairs.positions(t) if positions is None else positions
        mask = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
        if segment_ids is not None:
            mask = mask & (segment_ids != 0)
        new_cache = None
        if cache is None:
            if positions is None:
                positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
            q_slot = kv_slot = jnp.arange(t)
            kv_pos, kv_valid, index = positions, mask, None
        else:
            index = cache["index"]
            if positions is None:
                prev = jnp.max(jnp.where(cache["valid"], cache["positions"], -1), axis=-1)
                positions = prev[:, None] + 1 + jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
            zero = jnp.zeros((), jnp.int32)
            kv_pos = jax.lax.dynamic_update_slice(
                cache["positions"], positions.astype(jnp.int32), (zero, index)
            )
            kv_valid = jax.lax.dynamic_update_slice(cache["valid"], mask, (zero, index))
            q_slot, kv_slot = index + jnp.arange(t), jnp.arange(kv_pos.shape[1])
            new_cache = {"positions": kv_pos, "valid": kv_valid, "index": index + t}
        positions = positions.astype(jnp.int32)
        attn_mask = make_mask(
            q_slot, kv_slot, kv_valid, positions, kv_pos, s.sliding_window, segment_ids, segment_ids
        )
        # the fused kernel may use its own causal mask when nothing else restricts attention
        is_causal = (
            cache is None and attention_mask is None and segment_ids is None and s.sliding_window is None
        )
        if is_causal and impl == "fused":
            attn_mask = None
        elif (
            impl == "fused"
            and self.max_segments is not None
            and cache is None
            and s.position_type != "alibi"  # the bias path keeps its dense mask
        ):
            # segments as lengths + offsets for the fused kernel (no [B, 1, T, S] mask; attention.py)
            runs = mask.astype(jnp.int32) if segment_ids is None else jnp.where(mask, segment_ids, 0)
            attn_mask = segment_layout(runs, self.max_segments)
        if pairs is not None:
            attn_mask = pairs  # attention.py: the dense pair mask (plain) or the virtual rows (fused)

        embed = Embed(
            s.vocab_size,
            s.word_embed_proj_dim or s.hidden_size,
            compute_dtype=self.compute_dtype,
            name="embed_tokens",
        )
        x = embed(input_ids)
        if s.word_embed_proj_dim:
            x = Dense(s.hidden_size, ("embed", "embed"), name="project_in", compute_dtype=self.compute_dtype)(
                x
            )
        if s.position_type == "learned":
            pos_table = Embed(
                s.max_position_embeddings + s.learned_pos_offset,
                s.hidden_size,
                axes=("positions", "embed"),
                compute_dtype=self.compute_dtype,
                name="embed_positions",
            )
            x = x + pos_table(positions + s.learned_pos_offset).astype(x.dtype)
        if s.embed_norm:
            x = Norm(s.norm_type, s.norm_eps, name="embed_norm")(x)
        if isinstance(attn_mask, SegmentLayout) and attn_mask.ok is not None:
            # a row that breaks the segment contract is NaN from its embeddings on (one select here instead
            # of one on every layer's attention output, forward and backward)
            x = jnp.where(attn_mask.ok[:, None, None], x, jnp.full((), jnp.nan, x.dtype))
            attn_mask = attn_mask._replace(ok=None)
        x = constrain(x, ACT)

        rope = bias = None
        if s.position_type == "rope":
            rope = rope_tables(positions, rope_inv_freq(s.head_dim, s.rope_theta, s.rope_scaling_dict))
        elif s.position_type == "alibi":
            # HF BLOOM: bias = slope_h * key_position (softmax is invariant to the per-query shift). The
            # fused kernel takes the bias in the compute dtype, so there it is made relative to the query
            # (small near the diagonal, where bf16 rounding would otherwise blur neighbouring keys).
            key_pos = kv_pos[:, None, None, :].astype(jnp.float32)
            if impl == "fused":
                key_pos = key_pos - positions[:, None, :, None].astype(jnp.float32)
            bias = alibi_slopes(s.num_heads)[None, :, None, None] * key_pos

        block_cls = Block
        if self.remat != "none":
            if self.remat not in _REMAT_POLICIES:
                raise ValueError(f"remat must be 'none', 'full' or 'save_dots', got {self.remat!r}")
            block_cls = nn.remat(Block, policy=_REMAT_POLICIES[self.remat], static_argnums=(7,))
        layer_caches = []
        for i in range(s.num_layers):
            layer_cache = None if cache is None else cache["layers"][i]
            block = block_cls(s, self.compute_dtype, self.lora_config, impl, name=f"layers_{i}")
            x, c = block(x, attn_mask, bias, rope, layer_cache, index, is_causal)
            layer_caches.append(c)

        if s.final_norm:
            x = Norm(s.norm_type, s.norm_eps, name="final_norm")(x)
        if s.word_embed_proj_dim:
            x = Dense(
                s.word_embed_proj_dim,
                ("embed", "embed"),
                name="project_out",
                compute_dtype=self.compute_dtype,
            )(x)
        hidden = x
        if s.tie_word_embeddings:
            logits = embed.attend(x)
        else:
            logits = LMHead(s.vocab_size, self.compute_dtype, name="lm_head")(x)
        logits = constrain(logits, ("batch", "length", "act_vocab"))
        if new_cache is not None:
            new_cache["layers"] = tuple(layer_caches)
        return logits, hidden, new_cache


def lm_head_operands(
    spec: ModelSpec, params: dict, hidden: jax.Array, compute_dtype: Any = None, vocab_major: bool = False
):
    """``(h [..., E], kernel [E, V])`` in the compute dtype; logits = ``h @ kernel`` (f32 accumulation).

    ``hidden`` is ``ForwardOutput.hidden`` (after the final norm and OPT's ``project_out``); the kernel is
    ``embed_tokens/embedding`` transposed when tied, else ``lm_head/kernel``. ``vocab_major``: the kernel
    as ``[V, E]`` instead (logits = ``h @ kernel.T``).
    """
    if spec.tie_word_embeddings:
        w = params["embed_tokens"]["embedding"]
        dtype = compute_dtype or w.dtype
        return hidden.astype(dtype), (w.astype(dtype) if vocab_major else w.astype(dtype).T)
    w = params["lm_head"]["kernel"]
    dtype = compute_dtype or w.dtype
    return hidden.astype(dtype), (w.astype(dtype).T if vocab_major else w.astype(dtype))


def lm_head(spec: ModelSpec, params: dict, hidden: jax.Array, compute_dtype: Any = None) -> jax.Array:
    """f32 logits ``[..., V]`` of ``hidden [..., E]``: the same einsum as :class:`Decoder`'s head."""
    h, w = lm_head_operands(spec, params, hidden, compute_dtype)
    if spec.tie_word_embeddings:
        return einsum_f32_out("...e,ve->...v", h, w.T)
    return einsum_f32_out("...e,ev->...v", h, w)


class LMHead(nn.Module):
    """Untied output head ``kernel [E, V]``; logits accumulate in float32."""

    vocab_size: int
    compute_dtype: Any = None

    @nn.compact
    def __call__(self, x):
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed", "vocab")),
            (x.shape[-1], self.vocab_size),
        )
        dtype = self.compute_dtype or kernel.dtype
        return einsum_f32_out("...e,ev->...v", x.astype(dtype), kernel.astype(dtype))
