"""Decoder properties: causality, padding invariance, packing, KV cache, fused attention, dtypes, LoRA."""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _hf_tiny import tiny_hf_config
from hypothesis import given
from hypothesis import strategies as st

from jaxrlhf import models
from jaxrlhf.models.attention import attend
from jaxrlhf.models.spec import ModelSpec

T = 8
_fwd = jax.jit(
    models.forward,
    static_argnums=0,
    static_argnames=("attention_impl", "compute_dtype", "remat", "lora_config"),
)


@functools.cache
def _model(name: str):
    spec = ModelSpec.from_hf_config(tiny_hf_config(name).to_dict())
    if name == "mistral":
        spec = spec.replace(sliding_window=3)
    return spec, random_params(spec)


def random_params(spec: ModelSpec, seed: int = 0) -> dict:
    """Params drawn with numpy (no init compilation); norms near 1, every bias non-zero."""
    rng = np.random.default_rng(seed)

    def draw(path, x):
        scale = path[-1].key == "scale"
        return jnp.asarray((scale + 0.1 * rng.standard_normal(x.shape)).astype(np.float32))

    return jax.tree_util.tree_map_with_path(draw, models.abstract_params(spec))


def _ids(seed: int, shape=(2, T)) -> np.ndarray:
    # numpy inputs and fixed shapes: one compilation per test, whatever hypothesis draws
    return np.random.default_rng(seed).integers(3, 128, size=shape).astype(np.int32)


@pytest.mark.parametrize("name", ["llama3", "bloom", "opt"])
@given(seed=st.integers(0, 1000), cut=st.integers(1, T - 1))
def test_causality(name, seed, cut):
    spec, params = _model(name)
    ids = _ids(seed)
    other = ids.copy()
    other[:, cut:] = _ids(seed + 1)[:, cut:]
    a = _fwd(spec, params, ids).logits
    b = _fwd(spec, params, other).logits
    chex.assert_trees_all_close(a[:, :cut], b[:, :cut], atol=1e-5)


@pytest.mark.parametrize("name", ["llama3", "mistral", "bloom", "gpt2"])
@given(seed=st.integers(0, 1000), pad=st.integers(1, 4))
def test_left_padding_invariance(name, seed, pad):
    spec, params = _model(name)
    ids = _ids(seed, (1, T))
    padded = np.concatenate([np.zeros((1, pad), ids.dtype), ids[:, : T - pad]], axis=1)
    mask = np.arange(T)[None] >= pad
    # unpadded logits of the first T - pad tokens (causal: the tokens after them do not matter)
    a = _fwd(spec, params, ids).logits[:, : T - pad]
    b = _fwd(spec, params, padded, mask).logits[:, pad:]
    chex.assert_trees_all_close(a, b, atol=1e-5)


@pytest.mark.parametrize("name", ["llama3", "mistral", "bloom", "opt"])
@given(seed=st.integers(0, 1000), n1=st.integers(1, 6), n2=st.integers(1, 3))
def test_packed_segments_equal_separate(name, seed, n1, n2):
    spec, params = _model(name)
    ids = _ids(seed, (1, T))
    m = min(n2, T - n1)
    seg = np.asarray([[1] * n1 + [2] * m + [0] * (T - n1 - m)])
    pos = np.where(seg == 2, np.arange(T) - n1, np.arange(T)) * (seg > 0)
    packed = _fwd(spec, params, ids, seg > 0, positions=pos, segment_ids=seg).logits
    # each example alone, placed at the start of a length-T row (causal: what follows does not matter)
    first = _fwd(spec, params, ids).logits
    chex.assert_trees_all_close(packed[:, :n1], first[:, :n1], atol=1e-5)
    if m > 0:
        alone = np.concatenate([ids[:, n1:], ids[:, :n1]], axis=1)
        second = _fwd(spec, params, alone).logits
        chex.assert_trees_all_close(packed[:, n1 : n1 + m], second[:, :m], atol=1e-5)


@pytest.mark.parametrize("name", ["llama3", "mistral", "bloom", "opt_post", "gpt2"])
def test_kv_cache_prefill_and_decode_equal_full_forward(name):
    spec, params = _model(name)
    ids = _ids(3, (3, 10))
    mask = jnp.asarray([[1] * 10, [0] * 3 + [1] * 7, [0] * 6 + [1] * 4])
    full = _fwd(spec, params, ids, mask).logits
    prefill = 6
    out = _fwd(spec, params, ids[:, :prefill], mask[:, :prefill], cache=models.init_cache(spec, 3, 12))
    real = np.asarray(mask, bool)
    np.testing.assert_allclose(
        np.asarray(out.logits)[real[:, :prefill]], np.asarray(full[:, :prefill])[real[:, :prefill]], atol=1e-5
    )
    cache = out.cache
    for t in range(prefill, 10):
        out = _fwd(spec, params, ids[:, t : t + 1], mask[:, t : t + 1], cache=cache)
        cache = out.cache
        rows = real[:, t]
        np.testing.assert_allclose(
            np.asarray(out.logits[:, 0])[rows], np.asarray(full[:, t])[rows], atol=1e-5
        )
    assert int(cache["index"]) == 10
    chex.assert_shape(cache["layers"][0]["k"], (3, 12, spec.num_kv_heads, spec.head_dim))


@pytest.mark.parametrize("name", ["llama3", "bloom", "opt", "gpt2"])
def test_fused_projections_same_function(name):
    spec, params = _model(name)
    fused = models.fuse_projections(spec, params)
    layer = fused["layers_0"]
    assert "qkv_proj" in layer["attn"] and not {"q_proj", "k_proj", "v_proj"} & set(layer["attn"])
    assert ("gate_up_proj" in layer["mlp"]) == spec.gated_mlp
    assert ("up_proj" in layer["mlp"]) != spec.gated_mlp
    e = spec.hidden_size
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    chex.assert_shape(layer["attn"]["qkv_proj"]["kernel"], (e, q + 2 * kv))
    n_params = lambda t: sum(x.size for x in jax.tree.leaves(t))  # noqa: E731
    assert n_params(fused) == n_params(params)
    ids = _ids(5, (2, T))
    mask = jnp.asarray([[1] * T, [0] * 3 + [1] * (T - 3)])
    real = np.asarray(mask, bool)
    a = _fwd(spec, params, ids, mask).logits
    b = _fwd(spec, fused, ids, mask).logits
    np.testing.assert_allclose(np.asarray(b)[real], np.asarray(a)[real], atol=1e-5)
    # and with the KV cache, one decode step after a prefill
    ca = _fwd(spec, params, ids[:, :-1], mask[:, :-1], cache=models.init_cache(spec, 2, T)).cache
    cb = _fwd(spec, fused, ids[:, :-1], mask[:, :-1], cache=models.init_cache(spec, 2, T)).cache
    sa = _fwd(spec, params, ids[:, -1:], mask[:, -1:], cache=ca).logits
    sb = _fwd(spec, fused, ids[:, -1:], mask[:, -1:], cache=cb).logits
    np.testing.assert_allclose(np.asarray(sb), np.asarray(sa), atol=1e-5)


@pytest.mark.parametrize("name", ["llama3", "mistral", "bloom"])
def test_fused_attention_matches_plain(name):
    spec, params = _model(name)
    ids = _ids(4, (2, T))
    mask = jnp.asarray([[1] * T, [0] * 3 + [1] * (T - 3)])
    for m in (mask, None):
        plain = _fwd(spec, params, ids, m, attention_impl="plain").logits
        fused = _fwd(spec, params, ids, m, attention_impl="fused").logits
        real = np.ones((2, T), bool) if m is None else np.asarray(m, bool)
        np.testing.assert_allclose(np.asarray(fused)[real], np.asarray(plain)[real], atol=1e-5)


def test_gqa_attend_equals_repeated_kv_reference():
    """Grouped attention (no K/V repeat) equals the textbook MHA over repeated K/V heads."""
    q, k, v = (
        jax.random.normal(jax.random.key(i), s)
        for i, s in enumerate([(2, 5, 6, 4), (2, 5, 2, 4), (2, 5, 2, 4)])
    )
    mask = jnp.tril(jnp.ones((5, 5), bool))[None, None]

    @jax.jit
    def both(q, k, v):
        kr, vr = jnp.repeat(k, 3, axis=2), jnp.repeat(v, 3, axis=2)
        s = jnp.einsum("bthd,bshd->bhts", q, kr) * 0.5
        p = jax.nn.softmax(jnp.where(mask, s, -jnp.inf), axis=-1)
        return attend(q, k, v, mask, scale=0.5), jnp.einsum("bhts,bshd->bthd", p, vr)

    chex.assert_trees_all_close(*both(q, k, v), atol=1e-6)


def test_bf16_compute_and_params_close_to_f32():
    spec, params = _model("llama3")
    ids = _ids(5)
    ref = _fwd(spec, params, ids).logits
    bf = _fwd(spec, params, ids, compute_dtype=jnp.bfloat16).logits
    assert bf.dtype == jnp.float32
    p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    bf2 = _fwd(spec, p16, ids).logits
    for x in (bf, bf2):
        assert float(jnp.abs(x - ref).max()) < 0.05 * float(jnp.abs(ref).max())
    assert float(jnp.abs(bf - ref).max()) > 0  # really computed in bf16


def test_remat_policies_same_value_and_grad():
    spec = _model("llama3")[0].replace(num_layers=1)
    params = random_params(spec, 2)
    ids = _ids(6)

    def loss(p, remat):
        return jnp.mean(models.forward(spec, p, ids, remat=remat).logits ** 2)

    ref_v, ref_g = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, "none")
    for remat in ("full", "save_dots"):
        v, g = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, remat)
        chex.assert_trees_all_close((v, g), (ref_v, ref_g), atol=1e-6, rtol=1e-5)


@dataclasses.dataclass(frozen=True)
class _Lora:
    scale: float
    dropout: float = 0.0


def test_lora_delta_equals_merged_weights():
    spec, params = _model("llama3")
    ids = _ids(7)
    r = 2
    a = jax.random.normal(jax.random.key(8), (32, r))
    b = jax.random.normal(jax.random.key(9), (r, 32)) * 0.1
    lora = {"layers_1": {"attn": {"q_proj": {"lora_a": a, "lora_b": b}}}}
    cfg = _Lora(scale=2.0)
    out = _fwd(spec, params, ids, lora=lora, lora_config=cfg).logits
    merged = jax.tree.map(lambda x: x, params)
    merged["layers_1"]["attn"]["q_proj"]["kernel"] = (
        params["layers_1"]["attn"]["q_proj"]["kernel"] + 2.0 * a @ b
    )
    chex.assert_trees_all_close(out, _fwd(spec, merged, ids).logits, atol=1e-5)
    zero = {"layers_1": {"attn": {"q_proj": {"lora_a": a, "lora_b": jnp.zeros_like(b)}}}}
    chex.assert_trees_all_close(
        _fwd(spec, params, ids, lora=zero, lora_config=cfg).logits,
        _fwd(spec, params, ids).logits,
    )
    # dropout only with an rng; with one the output changes and stays finite
    drop = _Lora(scale=2.0, dropout=0.5)
    chex.assert_trees_all_close(_fwd(spec, params, ids, lora=lora, lora_config=drop).logits, out)
    d = _fwd(spec, params, ids, lora=lora, lora_config=drop, dropout_rng=jax.random.key(3)).logits
    assert bool(jnp.isfinite(d).all()) and float(jnp.abs(d - out).max()) > 1e-4


@pytest.mark.parametrize("name", ["llama3", "opt"])
@pytest.mark.parametrize("lora", [False, True])
def test_mlp_backward_keeps_only_the_projection_outputs(name, lora, capsys):
    """Per layer the backward keeps the MLP's up (and gate) projection outputs, not the activation or the
    product fed to the down projection (recomputed elementwise from them, as Liger's SwiGLU does): with
    LoRA, whose down-projection A gradient needs that product, and in full fine-tuning."""
    from jax.ad_checkpoint import print_saved_residuals

    spec, params = _model(name)
    inter = spec.intermediate_size
    assert inter not in (spec.hidden_size, spec.vocab_size, spec.head_dim * spec.num_heads)
    ids = _ids(11)
    r = 2
    down = {"lora_a": jnp.ones((inter, r)) * 0.01, "lora_b": jnp.ones((r, spec.hidden_size)) * 0.01}
    adapters = {f"layers_{i}": {"mlp": {"down_proj": down}} for i in range(spec.num_layers)}
    cfg = _Lora(scale=2.0)

    def loss(trainable):
        base, ad = (params, trainable) if lora else (trainable, None)
        return jnp.mean(models.forward(spec, base, ids, lora=ad, lora_config=cfg).logits ** 2)

    capsys.readouterr()
    print_saved_residuals(loss, adapters if lora else params)  # "f32[2,8,48] output of add from ..." lines
    lines = capsys.readouterr().out.splitlines()
    # activations [B, T, I] (the frozen weights are constants, the trainable ones arguments)
    wide = [x for x in lines if x.split(" ")[0].endswith(f",{inter}]") and x.split(" ")[0].count(",") == 2]
    per_layer = 2 if spec.gated_mlp else 1  # gate and up, or up
    assert len(wide) == per_layer * spec.num_layers, wide
    # and the values and gradients are those of the plain composition
    v, g = jax.value_and_grad(loss)(adapters if lora else params)
    assert bool(jnp.isfinite(v)) and all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(g))


def test_param_tree_names_and_axes():
    for name, extra in [
        ("opt_post", {"project_in", "project_out", "embed_positions"}),
        ("bloom", {"embed_norm"}),
    ]:
        spec, params = _model(name)
        axes = models.param_axes(spec)
        assert jax.tree.structure(params) == jax.tree.structure(axes, is_leaf=lambda x: isinstance(x, tuple))
        assert extra <= set(params)
        jax.tree.map(
            lambda p, a: len(a) == p.ndim or pytest.fail(f"{a} vs {p.shape}"),
            params,
            axes,
            is_leaf=lambda x: isinstance(x, tuple),
        )
    spec, params = _model("llama2")
    assert "lm_head" in params and set(params["layers_0"]["mlp"]) == {"gate_proj", "up_proj", "down_proj"}
    assert models.param_axes(spec)["layers_0"]["attn"]["k_proj"]["kernel"] == ("embed", "kv_heads")
    spec, params = _model("gpt2")
    assert "lm_head" not in params and set(params["layers_0"]["mlp"]) == {"up_proj", "down_proj"}
    assert models.count_params(spec) == sum(x.size for x in jax.tree.leaves(params))
