"""T5 building blocks as pure functions over plain param dicts (used by :mod:`jaxrlhf.models.t5`).

Shapes: B batch, T query length, S key length, E d_model, H heads, D d_kv, F d_ff, V vocab.
T5 differs from the decoder-only families in three ways that live here:
  * the norm is RMS without mean subtraction and without bias: ``y = scale * x / sqrt(mean(x^2) + eps)``;
  * attention logits are NOT scaled by 1/sqrt(D): ``softmax(q k^T + bias + mask) v``;
  * ``bias`` is a learned per-head scalar for each relative-position bucket of ``key_pos - query_pos``.
"""

from __future__ import annotations

import math
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf.models.attention import resolve_attention_impl
from jaxrlhf.models.layers import lora_delta
from jaxrlhf.sharding import constrain

Params = dict[str, Any]

_ACT = {
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


def activation(name: str):
    if name not in _ACT:
        raise ValueError(f"T5 does not support activation {name!r}; supported: {sorted(_ACT)}")
    return _ACT[name]


def sub_rng(rng: jax.Array | None, *path: str) -> jax.Array | None:
    """A dropout key for one named layer: ``fold_in(rng, crc32("encoder/layers_0/attn/q_proj"))``."""
    if rng is None:
        return None
    return jax.random.fold_in(rng, zlib.crc32("/".join(path).encode()) & 0x7FFFFFFF)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """T5 LayerNorm [..., E] -> [..., E]: ``scale * x * rsqrt(mean(x^2) + eps)``, accumulated in float32."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (scale.astype(jnp.float32) * y).astype(x.dtype)


def dense(
    x: jax.Array,
    p: Params,
    lora: Params | None,
    lora_config: Any,
    rng: jax.Array | None,
) -> jax.Array:
    """``x @ kernel`` [..., in] -> [..., out] (no bias in T5), plus LoRA when ``lora`` holds adapters:

    ``y += lora_config.scale * dropout(x) @ lora_a @ lora_b``. Dropout only when ``rng`` is given.
    """
    y = x @ p["kernel"].astype(x.dtype)
    if lora is not None and "lora_a" in lora:
        if lora_config is None:
            raise ValueError("LoRA adapters were given without lora_config (needs .scale and .dropout)")
        y = y + lora_delta(x, lora["lora_a"], lora["lora_b"], lora_config, rng)
    return y


def _child(tree: Params | None, name: str) -> Params | None:
    return None if tree is None else tree.get(name)


def mlp(
    x: jax.Array, p: Params, lora: Params | None, cfg: Any, rng, act: str, gated: bool, path
) -> jax.Array:
    """[B,T,E] -> [B,T,E]. Gated (v1.1/UL2): ``down(act(gate(x)) * up(x))``; v1.0: ``down(act(up(x)))``.

    HF names: wi_0 = gate_proj, wi_1 = up_proj (gated) or wi = up_proj, wo = down_proj.
    """
    f = activation(act)
    up = dense(x, p["up_proj"], _child(lora, "up_proj"), cfg, sub_rng(rng, *path, "up_proj"))
    if gated:
        gate = dense(x, p["gate_proj"], _child(lora, "gate_proj"), cfg, sub_rng(rng, *path, "gate_proj"))
        h = f(gate) * up
    else:
        h = f(up)
    h = constrain(h, ("batch", "length", "act_mlp"))
    return dense(h, p["down_proj"], _child(lora, "down_proj"), cfg, sub_rng(rng, *path, "down_proj"))


def project_heads(x, p, lora, cfg, rng, name: str, num_heads: int, path) -> jax.Array:
    """[B,T,E] -> [B,T,H,D] through the ``name`` projection."""
    y = dense(x, p[name], _child(lora, name), cfg, sub_rng(rng, *path, name))
    y = y.reshape(*y.shape[:-1], num_heads, -1)
    return constrain(y, ("batch", "length", "act_heads", None))


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    bias: jax.Array | None,
    mask: jax.Array,
    impl: str = "plain",
) -> jax.Array:
    """Unscaled T5 attention. q [B,T,H,D], k/v [B,S,H,D], bias [b,H,T,S] float, mask [B,1|H,T|1,S] bool.

    ``out = softmax(q k^T + bias, masked) v`` -> [B,T,H,D]. Scores and softmax in float32. A row with no
    allowed key (a padded query with nothing before it) gets uniform weights, like HF's additive mask.
    """
    impl = resolve_attention_impl(impl, q.dtype)
    if impl == "fused":
        b = None if bias is None else bias.astype(jnp.float32 if q.dtype == jnp.float32 else q.dtype)
        m = jnp.broadcast_to(mask, (q.shape[0], q.shape[2], q.shape[1], k.shape[1]))
        return jax.nn.dot_product_attention(q, k, v, bias=b, mask=m, scale=1.0)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    if bias is not None:
        s = s + bias.astype(jnp.float32)
    s = jnp.where(mask, s, jnp.finfo(jnp.float32).min)
    w = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", w, v)


def attention_block(
    x_q: jax.Array,
    x_kv: jax.Array | None,
    p: Params,
    lora: Params | None,
    cfg: Any,
    rng,
    *,
    num_heads: int,
    bias,
    mask,
    impl: str,
    path,
    kv: tuple[jax.Array, jax.Array] | None = None,
) -> jax.Array:
    """q from ``x_q``; k, v from ``x_kv`` (self: x_q, cross: encoder outputs) or given as ``kv``; o_proj."""
    q = project_heads(x_q, p, lora, cfg, rng, "q_proj", num_heads, path)
    if kv is None:
        k = project_heads(x_kv, p, lora, cfg, rng, "k_proj", num_heads, path)
        v = project_heads(x_kv, p, lora, cfg, rng, "v_proj", num_heads, path)
    else:
        k, v = kv
    out = attend(q, k.astype(q.dtype), v.astype(q.dtype), bias, mask, impl)
    out = out.reshape(*out.shape[:2], -1)
    return dense(out, p["o_proj"], _child(lora, "o_proj"), cfg, sub_rng(rng, *path, "o_proj"))


def encoder_layer(x, p, lp, bias, mask, rng, *, spec, cfg, impl, path):
    """Pre-norm encoder block [B,S,E] -> [B,S,E]: ``x += attn(norm(x)); x += mlp(norm(x))``."""
    eps, heads = spec.norm_eps, spec.num_heads
    h = rms_norm(x, p["input_norm"]["scale"], eps)
    x = x + attention_block(
        h,
        h,
        p["attn"],
        _child(lp, "attn"),
        cfg,
        rng,
        num_heads=heads,
        bias=bias,
        mask=mask,
        impl=impl,
        path=path + ("attn",),
    )
    h = rms_norm(x, p["post_attn_norm"]["scale"], eps)
    x = x + mlp(h, p["mlp"], _child(lp, "mlp"), cfg, rng, spec.activation, spec.gated_mlp, path + ("mlp",))
    return constrain(x, ("batch", "length", "act_embed"))


def decoder_layer(
    x,
    p,
    lp,
    self_bias,
    self_mask,
    enc,
    cross_kv,
    cross_mask,
    layer_cache,
    index,
    rng,
    *,
    spec,
    cfg,
    impl,
    path,
):
    """Decoder block [B,T,E] -> ([B,T,E], new layer cache or None): self-attn (writing the cache at
    ``index`` when given), cross-attn over ``enc`` (or precomputed ``cross_kv``), MLP; each pre-norm."""
    eps, heads = spec.norm_eps, spec.num_heads
    h = rms_norm(x, p["input_norm"]["scale"], eps)
    alp = _child(lp, "attn")
    k = project_heads(h, p["attn"], alp, cfg, rng, "k_proj", heads, path + ("attn",))
    v = project_heads(h, p["attn"], alp, cfg, rng, "v_proj", heads, path + ("attn",))
    new_cache = None
    if layer_cache is not None:
        start = (0, index, 0, 0)
        k = jax.lax.dynamic_update_slice(layer_cache["k"], k.astype(layer_cache["k"].dtype), start)
        v = jax.lax.dynamic_update_slice(layer_cache["v"], v.astype(layer_cache["v"].dtype), start)
        new_cache = {"k": k, "v": v}
    x = x + attention_block(
        h,
        None,
        p["attn"],
        alp,
        cfg,
        rng,
        num_heads=heads,
        bias=self_bias,
        mask=self_mask,
        impl=impl,
        path=path + ("attn",),
        kv=(k, v),
    )
    h = rms_norm(x, p["cross_attn_norm"]["scale"], eps)
    x = x + attention_block(
        h,
        enc,
        p["cross_attn"],
        _child(lp, "cross_attn"),
        cfg,
        rng,
        num_heads=heads,
        bias=None,
        mask=cross_mask,
        impl=impl,
        path=path + ("cross_attn",),
        kv=cross_kv,
    )
    h = rms_norm(x, p["post_attn_norm"]["scale"], eps)
    x = x + mlp(h, p["mlp"], _child(lp, "mlp"), cfg, rng, spec.activation, spec.gated_mlp, path + ("mlp",))
    return constrain(x, ("batch", "length", "act_embed")), new_cache


# ------------------------------------------------------------------------- relative position buckets


def _bucket_table(num_buckets: int, max_distance: int) -> np.ndarray:
    """Bucket of each distance n in [0, max(max_distance, num_buckets)] for one direction.

    Exact buckets for n < num_buckets // 2, then log-spaced up to ``max_distance``, clipped to the last
    bucket. Computed in float32 in the same operation order as HF/Mesh-TF so boundary distances (where the
    log ratio is an exact integer) land in the same bucket; farther distances all share the last bucket.
    """
    max_exact = num_buckets // 2
    n = np.arange(max(max_distance, num_buckets) + 1, dtype=np.int64)
    safe = np.maximum(n, 1).astype(np.float32)
    ratio = np.log(safe / np.float32(max_exact)) / np.float32(math.log(max_distance / max_exact))
    large = max_exact + (ratio * np.float32(num_buckets - max_exact)).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    return np.where(n < max_exact, n, large).astype(np.int32)


def relative_bucket(rel: jax.Array, *, bidirectional: bool, num_buckets: int, max_distance: int) -> jax.Array:
    """Bucket id in [0, num_buckets) of ``rel = key_pos - query_pos`` (int array of any shape).

    Bidirectional (encoder): half the buckets for rel > 0, each half bucketed by |rel|.
    Unidirectional (decoder): only rel <= 0 matters, bucketed by -rel (rel > 0 maps to bucket 0).
    """
    if bidirectional:
        half = num_buckets // 2
        table = jnp.asarray(_bucket_table(half, max_distance))
        n = jnp.minimum(jnp.abs(rel), table.shape[0] - 1)
        return jnp.where(rel > 0, half, 0) + table[n]
    table = jnp.asarray(_bucket_table(num_buckets, max_distance))
    n = jnp.minimum(jnp.maximum(-rel, 0), table.shape[0] - 1)
    return table[n]


def position_bias(
    rel_table: jax.Array,
    q_pos: jax.Array,
    k_pos: jax.Array,
    *,
    bidirectional: bool,
    num_buckets: int,
    max_distance: int,
) -> jax.Array:
    """Bias [b,H,T,S] from the table [num_buckets, H], query positions [b,T] and key positions [b,S]."""
    rel = k_pos[:, None, :] - q_pos[:, :, None]  # [b,T,S]
    buckets = relative_bucket(
        rel, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
    )
    return jnp.transpose(rel_table[buckets], (0, 3, 1, 2))
