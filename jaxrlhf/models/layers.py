"""Building blocks shared by the decoder and T5: Dense (with LoRA), Embed, norms, activations, RoPE, ALiBi.

All modules store parameters in float32 boxes with logical axis names (``nn.with_logical_partitioning``); the
public API unboxes them into plain dicts. ``compute_dtype`` casts parameters and activations at use; norms,
softmax and rotary tables are always evaluated in float32.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

_INIT_STD = 0.02


def _boxed(init, axes: tuple[str | None, ...]):
    return nn.with_logical_partitioning(init, axes)


def lora_delta(x: jax.Array, a: jax.Array, b: jax.Array, config: Any, rng: jax.Array | None) -> jax.Array:
    """The LoRA term of an adapted Dense layer, in ``x``'s dtype: ``scale * dropout(x) @ a @ b``.

    ``x [..., in]``, ``a [in, r]``, ``b [r, out]``; ``config`` has ``.scale`` and ``.dropout`` (a rate);
    dropout (inverted, like torch) applies only when ``rng`` is given and the rate is > 0. The one
    implementation used by the decoder (``Dense``) and T5 (``_t5_layers.dense``)."""
    h = x
    rate = float(getattr(config, "dropout", 0.0) or 0.0)
    if rate > 0.0 and rng is not None:
        keep = jax.random.bernoulli(rng, 1.0 - rate, h.shape)
        h = jnp.where(keep, h / (1.0 - rate), jnp.zeros_like(h))
    return (config.scale * ((h @ a.astype(x.dtype)) @ b.astype(x.dtype))).astype(x.dtype)


class Dense(nn.Module):
    """``y = x @ kernel + bias`` with kernel ``[in, out]``, plus a LoRA delta when adapters are present.

    LoRA (collection ``"lora"``, variables ``lora_a [in, r]`` and ``lora_b [r, out]`` at this module's path):
    ``y += scale * dropout(x) @ lora_a @ lora_b``; dropout needs the ``"dropout"`` rng and a rate > 0.
    """

    features: int
    axes: tuple[str | None, str | None]
    use_bias: bool = False
    compute_dtype: Dtype | None = None
    lora_config: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel", _boxed(nn.initializers.normal(_INIT_STD), self.axes), (x.shape[-1], self.features)
        )
        dtype = self.compute_dtype or kernel.dtype
        x = x.astype(dtype)
        y = jnp.einsum("...i,io->...o", x, kernel.astype(dtype))
        if self.use_bias:
            bias = self.param("bias", _boxed(nn.initializers.zeros, (self.axes[1],)), (self.features,))
            y = y + bias.astype(dtype)
        if self.has_variable("lora", "lora_a"):
            if self.lora_config is None:
                raise ValueError(f"{'/'.join(self.scope.path)}: LoRA adapters given without lora_config")
            rng = self.make_rng("dropout") if self.has_rng("dropout") else None
            a, b = self.get_variable("lora", "lora_a"), self.get_variable("lora", "lora_b")
            y = y + lora_delta(x, a, b, self.lora_config, rng)
        return y


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def einsum_f32_out(subscripts: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """``einsum(subscripts, x, w)`` accumulated and returned in float32, with a backward in the inputs' dtype.

    For the LM head (``x [B, T, E]`` with ``w [V, E]`` or ``[E, V]`` -> logits ``[B, T, V]``): the forward
    keeps full-precision logits for the loss and log-probs; the backward rounds the logits' cotangent to
    ``x.dtype`` before the two gradient matmuls. Without this, JAX's transpose of a bf16 x bf16 -> f32 dot
    promotes the bf16 operands to f32 and runs both ``[B*T, V]`` gradient matmuls in f32 — on an H200 the
    1.24B model's SFT step spent 60 of 266 ms there (vs about 22 ms in bf16). In f32 it is a plain einsum.
    """
    return jnp.einsum(subscripts, x, w, preferred_element_type=jnp.float32)


def _einsum_f32_out_fwd(subscripts, x, w):
    return einsum_f32_out(subscripts, x, w), (x, w)


def _einsum_f32_out_bwd(subscripts, res, g):
    x, w = res
    g = g.astype(jnp.result_type(x, w))
    # transposes of the two linear maps: no forward recomputation (jax.vjp would run it outside jit)
    (dx,) = jax.linear_transpose(lambda a: jnp.einsum(subscripts, a, w), x)(g)
    (dw,) = jax.linear_transpose(lambda b: jnp.einsum(subscripts, x, b), w)(g)
    return dx, dw


einsum_f32_out.defvjp(_einsum_f32_out_fwd, _einsum_f32_out_bwd)


class Embed(nn.Module):
    """Token (or learned position) table ``embedding [num, features]``; ``attend`` is the tied output head."""

    num: int
    features: int
    axes: tuple[str | None, str | None] = ("vocab", "embed")
    compute_dtype: Dtype | None = None

    def setup(self):
        self.embedding = self.param(
            "embedding", _boxed(nn.initializers.normal(_INIT_STD), self.axes), (self.num, self.features)
        )

    def __call__(self, ids: jax.Array) -> jax.Array:
        table = self.embedding
        return jnp.take(table, ids, axis=0).astype(self.compute_dtype or table.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """Logits ``[..., num] = x @ embedding.T`` accumulated in float32."""
        dtype = self.compute_dtype or self.embedding.dtype
        return einsum_f32_out("...e,ve->...v", x.astype(dtype), self.embedding.astype(dtype))


class Norm(nn.Module):
    """RMSNorm (``x * rsqrt(mean(x^2) + eps) * scale``; "t5" is the same) or LayerNorm (with bias), in f32."""

    kind: str = "rmsnorm"
    eps: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        scale = self.param("scale", _boxed(nn.initializers.ones, ("norm",)), (dim,))
        in_dtype = x.dtype
        h = x.astype(jnp.float32)
        if self.kind in ("rmsnorm", "t5"):
            h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
            # HF casts back to the input dtype before the weight multiply
            return scale.astype(in_dtype) * h.astype(in_dtype)
        if self.kind != "layernorm":
            raise ValueError(f"unknown norm_type {self.kind!r}")
        bias = self.param("bias", _boxed(nn.initializers.zeros, ("norm",)), (dim,))
        mean = jnp.mean(h, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(h - mean), axis=-1, keepdims=True)
        h = (h - mean) * jax.lax.rsqrt(var + self.eps)
        return (h * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(in_dtype)


def activation(name: str, x: jax.Array) -> jax.Array:
    """HF activations by name: silu, relu, gelu (erf); gelu_new, gelu_pytorch_tanh, bloom_gelu (tanh)."""
    if name == "silu":
        return jax.nn.silu(x)
    if name == "relu":
        return jax.nn.relu(x)
    if name == "gelu":
        return jax.nn.gelu(x, approximate=False)
    if name in ("gelu_new", "gelu_pytorch_tanh", "bloom_gelu"):
        return jax.nn.gelu(x, approximate=True)
    raise ValueError(f"unsupported activation {name!r}")


# ---------------------------------------------------------------------------------------------- positions


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None = None) -> jax.Array:
    """Inverse frequencies ``theta^(-2i/D)``, i < D/2, with optional Llama-3.1 frequency-dependent scaling.

    llama3: wavelengths longer than ``original_max_position_embeddings / low_freq_factor`` are divided by
    ``factor``; shorter than ``... / high_freq_factor`` are kept; in between they are interpolated smoothly.
    """
    inv = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if not scaling:
        return inv
    if scaling.get("rope_type") != "llama3":
        raise ValueError(f"unsupported rope scaling {scaling!r}")
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv
    scaled = jnp.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)


def rope_tables(positions: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin ``[B, T, D]`` (halves repeated, HF ``rotate_half`` layout) for positions ``[B, T]``."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """``x * cos + rotate_half(x) * sin`` for ``x [B, T, N, D]``, computed in f32."""
    h = x.astype(jnp.float32)
    x1, x2 = jnp.split(h, 2, axis=-1)
    rot = jnp.concatenate([-x2, x1], axis=-1)
    return (h * cos[:, :, None, :] + rot * sin[:, :, None, :]).astype(x.dtype)


def alibi_slopes(num_heads: int) -> jax.Array:
    """BLOOM / ALiBi head slopes ``[H]`` (geometric; extra interleaved slopes when H is not a power of 2)."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = [base**p for p in range(1, closest + 1)]
    if closest != num_heads:
        extra_base = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        remaining = min(closest, num_heads - closest)
        slopes += [extra_base**p for p in range(1, 1 + 2 * remaining, 2)]
    return jnp.asarray(slopes, jnp.float32)
