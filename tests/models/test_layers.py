"""layers.einsum_f32_out: f32 logits forward, backward matmuls in the inputs' dtype."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf.models.layers import einsum_f32_out
from tests._jaxpr import all_eqns


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
