"""layers.einsum_f32_out (f32 logits forward, backward matmuls in the inputs' dtype) and models.lm_head."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from _hf_tiny import tiny_hf_config

from jaxrlhf import models
from jaxrlhf.models.layers import einsum_f32_out
from jaxrlhf.models.spec import ModelSpec
from tests._jaxpr import all_eqns


class _LoraCfg(NamedTuple):
    scale: float
    dropout: float


def _loss(fn, x, w, t):
    logits = fn(x, w)
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, t[..., None], -1)[..., 0])


@pytest.mark.parametrize("subscripts,w_shape", [("...e,ve->...v", (11, 6)), ("...e,ev->...v", (6, 11))])
def test_f32_inputs_are_a_plain_einsum(subscripts, w_shape):
    kx, kw, kt = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (2, 3, 6))
    w = jax.random.normal(kw, w_shape)
    t = jax.random.randint(kt, (2, 3), 0, 11)
    ours = jax.value_and_grad(
        lambda a, b: _loss(lambda p, q: einsum_f32_out(subscripts, p, q), a, b, t), (0, 1)
    )
    ref = jax.value_and_grad(lambda a, b: _loss(lambda p, q: jnp.einsum(subscripts, p, q), a, b, t), (0, 1))
    (v1, g1), (v2, g2) = ours(x, w), ref(x, w)
    np.testing.assert_allclose(v1, v2, rtol=1e-6)
    for a, b in zip(g1, g2, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_bf16_forward_is_f32_and_backward_matmuls_are_bf16():
    kx, kw, kt = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(kx, (2, 5, 8), jnp.bfloat16)
    w = jax.random.normal(kw, (13, 8), jnp.bfloat16)
    t = jax.random.randint(kt, (2, 5), 0, 13)
    out = einsum_f32_out("...e,ve->...v", x, w)
    assert out.dtype == jnp.float32
    exact = jnp.einsum("...e,ve->...v", x.astype(jnp.float32), w.astype(jnp.float32))
    np.testing.assert_allclose(out, exact, rtol=1e-6, atol=1e-6)  # products of bf16 are exact in f32

    grad = jax.grad(lambda a, b: _loss(lambda p, q: einsum_f32_out("...e,ve->...v", p, q), a, b, t), (0, 1))
    jaxpr = jax.make_jaxpr(grad)(x, w)
    dots = [e for e in all_eqns(jaxpr.jaxpr) if e.primitive.name == "dot_general"]
    assert len(dots) >= 3  # forward + two gradient matmuls
    for e in dots:  # no operand is promoted to f32: every matmul reads bf16 inputs
        assert all(v.aval.dtype == jnp.bfloat16 for v in e.invars), e
    gx, gw = grad(x, w)
    assert gx.dtype == jnp.bfloat16 and gw.dtype == jnp.bfloat16
    # the bf16 gradients agree with the f32 gradient to bf16 precision
    rx, rw = jax.grad(lambda a, b: _loss(lambda p, q: jnp.einsum("...e,ve->...v", p, q), a, b, t), (0, 1))(
        x.astype(jnp.float32), w.astype(jnp.float32)
    )
    np.testing.assert_allclose(np.asarray(gx, np.float32), rx, rtol=3e-2, atol=3e-3)
    np.testing.assert_allclose(np.asarray(gw, np.float32), rw, rtol=3e-2, atol=3e-3)


# ------------------------------------------------------------------------------------------- models.lm_head


def _random_params(spec, seed=0):
    rng = np.random.default_rng(seed)

    def draw(path, x):
        scale = path[-1].key == "scale"
        return jnp.asarray((scale + 0.1 * rng.standard_normal(x.shape)).astype(np.float32))

    return jax.tree_util.tree_map_with_path(draw, models.abstract_params(spec))


def _t5_spec(tied: bool):
    cfg = transformers.T5Config(
        vocab_size=96, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4, decoder_start_token_id=0,
        relative_attention_num_buckets=8, feed_forward_proj="relu" if tied else "gated-gelu",
        tie_word_embeddings=tied,
    )  # fmt: skip
    spec = ModelSpec.from_hf_config(cfg.to_dict())  # transformers 5 ties every T5 config: untie like Flan
    return spec if tied else spec.replace(tie_word_embeddings=False, scale_decoder_outputs=False)


def _spec(name):
    if name.startswith("t5"):
        return _t5_spec(tied=name == "t5_tied")
    return ModelSpec.from_hf_config(tiny_hf_config(name).to_dict())


@pytest.mark.parametrize("name", ["llama3", "llama2", "opt", "bloom", "gpt2", "t5_tied", "t5_untied"])
@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
def test_lm_head_on_hidden_equals_forward_logits(name, dtype):
    spec = _spec(name)
    assert spec.tie_word_embeddings == (name in ("llama3", "opt", "bloom", "gpt2", "t5_tied"))
    params = _random_params(spec)
    ids = np.random.default_rng(1).integers(1, 90, size=(2, 6)).astype(np.int32)
    kw = {"decoder_input_ids": ids} if spec.is_encoder_decoder else {}
    out = models.forward(spec, params, ids, compute_dtype=dtype, **kw)
    head = models.lm_head(spec, params, out.hidden, compute_dtype=dtype)
    assert head.dtype == jnp.float32 and head.shape == out.logits.shape
    np.testing.assert_array_equal(np.asarray(head), np.asarray(out.logits))
    # the operands of the chunked losses give the same logits (f32 accumulation)
    h, kernel = models.lm_head_operands(spec, params, out.hidden, compute_dtype=dtype)
    assert kernel.shape == (h.shape[-1], spec.vocab_size)
    via = jnp.einsum("...e,ev->...v", h, kernel, preferred_element_type=jnp.float32)
    tol = 2e-2 if dtype is not None and name == "t5_untied" else 1e-5  # T5's untied head rounds to bf16
    np.testing.assert_allclose(np.asarray(via), np.asarray(out.logits), rtol=tol, atol=tol)
    # vocab-major: the same kernel as [V, E]; a tied head is the embedding as stored
    _, kv = models.lm_head_operands(spec, params, out.hidden, compute_dtype=dtype, vocab_major=True)
    np.testing.assert_array_equal(np.asarray(kv), np.asarray(kernel).T)
    assert models.lm_head_vocab_major(spec) == spec.tie_word_embeddings


def test_lm_head_t5_lora_adapter_equals_forward():
    spec = _t5_spec(tied=False)
    params = _random_params(spec)
    rng = np.random.default_rng(2)
    lora = {"lm_head": {"lora_a": jnp.asarray(rng.standard_normal((16, 2)), jnp.float32),
                        "lora_b": jnp.asarray(rng.standard_normal((2, 96)), jnp.float32)}}  # fmt: skip
    cfg = _LoraCfg(scale=0.5, dropout=0.0)
    ids = rng.integers(1, 90, size=(2, 5)).astype(np.int32)
    out = models.forward(spec, params, ids, decoder_input_ids=ids, lora=lora, lora_config=cfg)
    head = models.lm_head(spec, params, out.hidden, lora=lora, lora_config=cfg)
    np.testing.assert_array_equal(np.asarray(head), np.asarray(out.logits))
    plain = models.lm_head(spec, params, out.hidden)
    assert not np.allclose(np.asarray(plain), np.asarray(head))  # the adapter did change the logits
