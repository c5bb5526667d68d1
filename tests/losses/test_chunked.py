"""Chunked LM head losses equal the plain ones (values and gradients) and never build [B, T, V] f32 logits."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jaxrlhf import losses
from jaxrlhf.models.layers import einsum_f32_out
from tests._jaxpr import all_eqns

B, T, E, V = 2, 7, 8, 37


def _inputs(seed=0, dtype=jnp.float32, bias=False):
    r = np.random.default_rng(seed)
    h = jnp.asarray(r.standard_normal((B, T, E)), dtype)
    w = jnp.asarray(r.standard_normal((E, V)) * 0.7, dtype)
    b = jnp.asarray(r.standard_normal((V,)) * 0.3, dtype) if bias else None
    y = jnp.asarray(r.integers(0, V, (B, T)), jnp.int32)
    m = jnp.asarray(r.random((B, T)) < 0.7, jnp.float32)
    return h, w, b, y, m


def _plain_logits(h, w, b):
    z = einsum_f32_out("bte,ev->btv", h, w)
    return z if b is None else z + b.astype(jnp.float32)


def _close(a, b, tol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), rtol=tol, atol=tol)


@pytest.mark.parametrize("smoothing,z_coef", [(0.0, 0.0), (0.1, 0.0), (0.0, 1e-3), (0.2, 1e-2)])
@pytest.mark.parametrize("chunk", [2, 5, 64])  # 2 tokens: one position per chunk; 5: a padded last chunk
@pytest.mark.parametrize("bias", [False, True])
def test_sft_loss_and_grads_equal_plain_f32(smoothing, z_coef, chunk, bias):
    h, w, b, y, m = _inputs(1, bias=bias)
    kw = dict(label_smoothing=smoothing, z_loss=z_coef)

    def ours(h, w, b):
        return losses.chunked_sft_loss(h, w, y, m, bias=b, chunk_size=chunk, **kw)

    def ref(h, w, b):
        return losses.sft_loss(_plain_logits(h, w, b), y, m, **kw)

    argnums = (0, 1, 2) if bias else (0, 1)
    (l1, m1), g1 = jax.value_and_grad(ours, argnums, has_aux=True)(h, w, b)
    (l2, m2), g2 = jax.value_and_grad(ref, argnums, has_aux=True)(h, w, b)
    _close((l1, m1), (l2, m2), 1e-5)
    _close(g1, g2, 1e-5)
    # without differentiation (eval) the same values
    _close(jax.jit(ours)(h, w, b), (l2, m2), 1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk", [2, 6, 64])
def test_token_logprobs_entropy_and_grads_equal_plain_f32(temperature, chunk):
    h, w, b, y, m = _inputs(2, bias=True)
    r = np.random.default_rng(3)
    a1, a2 = (jnp.asarray(r.standard_normal((B, T)), jnp.float32) for _ in range(2))

    def ours(h, w, b):
        lp, ent = losses.chunked_token_logprobs(
            h, w, y, bias=b, temperature=temperature, chunk_size=chunk, return_entropy=True
        )
        return jnp.sum(a1 * lp + a2 * ent), (lp, ent)

    def ref(h, w, b):
        z = _plain_logits(h, w, b)
        lp = losses.token_logprobs(z, y, temperature=temperature)
        ent = losses.token_entropy(z, temperature=temperature)
        return jnp.sum(a1 * lp + a2 * ent), (lp, ent)

    (v1, o1), g1 = jax.value_and_grad(ours, (0, 1, 2), has_aux=True)(h, w, b)
    (v2, o2), g2 = jax.value_and_grad(ref, (0, 1, 2), has_aux=True)(h, w, b)
    _close((v1, o1), (v2, o2), 1e-5)
    _close(g1, g2, 1e-5)
    # log-probs alone (entropy's cotangent absent), gradient in the hidden states only
    lp_only = jax.grad(
        lambda h: jnp.sum(a1 * losses.chunked_token_logprobs(h, w, y, bias=b, chunk_size=chunk))
    )
    lp_ref = jax.grad(lambda h: jnp.sum(a1 * losses.token_logprobs(_plain_logits(h, w, b), y)))
    _close(lp_only(h), lp_ref(h), 1e-5)


@given(seed=st.integers(0, 10_000), chunk=st.integers(1, 20), masked=st.booleans())
def test_property_logprobs_match_for_any_chunking(seed, chunk, masked):
    h, w, _, y, m = _inputs(seed)
    ours = losses.chunked_token_logprobs(h, w, y, chunk_size=chunk, mask=m if masked else None)
    ref = losses.token_logprobs(_plain_logits(h, w, None), y)
    _close(ours, jnp.where(m > 0, ref, 0.0) if masked else ref, 1e-5)


def test_bf16_inputs_within_bf16_tolerance():
    h, w, _, y, m = _inputs(4, dtype=jnp.bfloat16)

    def ours(h, w):
        return losses.chunked_sft_loss(h, w, y, m, chunk_size=4)[0]

    def ref(h, w):
        return losses.sft_loss(_plain_logits(h, w, None), y, m)[0]

    (l1, g1), (l2, g2) = (jax.value_and_grad(f, (0, 1))(h, w) for f in (ours, ref))
    assert g1[0].dtype == g1[1].dtype == jnp.bfloat16
    np.testing.assert_allclose(l1, l2, rtol=1e-6)  # bf16 products are exact in f32: same forward
    _close(g1, g2, 2e-2)
    lp1 = losses.chunked_token_logprobs(h, w, y, chunk_size=4)
    _close(lp1, losses.token_logprobs(_plain_logits(h, w, None), y), 1e-5)


def _dots(fn, *args):
    return [e for e in all_eqns(jax.make_jaxpr(fn)(*args).jaxpr) if e.primitive.name == "dot_general"]


def test_frozen_kernel_costs_no_weight_gradient_matmul():
    h, w, _, y, m = _inputs(5)
    sft = _dots(jax.grad(lambda h: losses.chunked_sft_loss(h, w, y, m, chunk_size=4)[0]), h)
    lp = _dots(jax.grad(lambda h: jnp.sum(losses.chunked_token_logprobs(h, w, y, chunk_size=4))), h)
    for dots in (sft, lp):
        shapes = [tuple(v.aval.shape) for e in dots for v in e.outvars]
        assert (E, V) not in shapes, shapes
    assert len(sft) == 2  # logits + dh: the SFT gradient reuses the forward's logits
    assert len(lp) == 3  # logits, recomputed logits, dh
    both = _dots(jax.grad(lambda h, w: losses.chunked_sft_loss(h, w, y, m, chunk_size=4)[0], (0, 1)), h, w)
    assert (E, V) in [tuple(v.aval.shape) for e in both for v in e.outvars]


@pytest.mark.parametrize("which", ["sft", "logprobs"])
def test_no_full_logits_buffer_in_jaxpr_or_compiled_temps(which):
    b, t, e, v, chunk = 4, 64, 16, 2048, 64  # 16 positions per chunk: 1/4 of the logits at a time
    r = np.random.default_rng(6)
    h = jnp.asarray(r.standard_normal((b, t, e)), jnp.bfloat16)
    w = jnp.asarray(r.standard_normal((e, v)), jnp.bfloat16)
    y = jnp.asarray(r.integers(0, v, (b, t)), jnp.int32)
    m = jnp.ones((b, t), jnp.float32)
    if which == "sft":

        def loss(h, w):
            return losses.chunked_sft_loss(h, w, y, m, chunk_size=chunk)[0]
    else:

        def loss(h, w):
            return jnp.sum(losses.chunked_token_logprobs(h, w, y, chunk_size=chunk))

    step = jax.value_and_grad(loss, (0, 1))
    full = b * t * v
    sizes = [math.prod(x.aval.shape) for eq in all_eqns(jax.make_jaxpr(step)(h, w).jaxpr) for x in eq.outvars]
    assert max(sizes) <= full // 4, max(sizes)
    temp = jax.jit(step).lower(h, w).compile().memory_analysis().temp_size_in_bytes
    assert temp < full * 4, (temp, full * 4)  # less than one [B, T, V] f32 buffer
    plain = jax.jit(
        jax.value_and_grad(lambda h, w: losses.sft_loss(_plain_logits(h, w, None), y, m)[0], (0, 1))
    )
    assert plain.lower(h, w).compile().memory_analysis().temp_size_in_bytes >= full * 4  # the check can fail


def test_bad_shapes_raise():
    h, w, _, y, m = _inputs(7)
    with pytest.raises(ValueError, match=r"hidden \[B, T, E\]"):
        losses.chunked_sft_loss(h, w.T, y, m)
    with pytest.raises(ValueError, match="targets"):
        losses.chunked_token_logprobs(h, w, y[:, :3])
    with pytest.raises(ValueError, match="loss_mask"):
        losses.chunked_sft_loss(h, w, y, m[:1])


def _rows_mask():
    """Rows whose masked positions sit at the end, the start and nowhere: the compaction has to move them."""
    m = np.zeros((3, T), np.float32)
    m[0, T - 3 :] = 1.0
    m[1, [0, 2, 5]] = 1.0
    return jnp.asarray(m)


@pytest.mark.parametrize("chunk", [3, 6, 64])
def test_token_logprobs_mask_equals_masked_plain_f32(chunk):
    r = np.random.default_rng(8)
    h = jnp.asarray(r.standard_normal((3, T, E)), jnp.float32)
    w = jnp.asarray(r.standard_normal((E, V)) * 0.7, jnp.float32)
    b = jnp.asarray(r.standard_normal((V,)) * 0.3, jnp.float32)
    y = jnp.asarray(r.integers(0, V, (3, T)), jnp.int32)
    m = _rows_mask()
    a1, a2 = (jnp.asarray(r.standard_normal((3, T)), jnp.float32) for _ in range(2))

    def ours(h, w, b):
        lp, ent = losses.chunked_token_logprobs(
            h, w, y, bias=b, mask=m, chunk_size=chunk, temperature=0.8, return_entropy=True
        )
        return jnp.sum(a1 * lp + a2 * ent), (lp, ent)

    def ref(h, w, b):
        z = _plain_logits(h, w, b)
        lp = jnp.where(m > 0, losses.token_logprobs(z, y, temperature=0.8), 0.0)
        ent = jnp.where(m > 0, losses.token_entropy(z, temperature=0.8), 0.0)
        return jnp.sum(a1 * lp + a2 * ent), (lp, ent)

    (v1, o1), g1 = jax.value_and_grad(ours, (0, 1, 2), has_aux=True)(h, w, b)
    (v2, o2), g2 = jax.value_and_grad(ref, (0, 1, 2), has_aux=True)(h, w, b)
    _close((v1, o1), (v2, o2), 1e-5)
    _close(g1, g2, 1e-5)
    assert not np.asarray(o1[0])[np.asarray(m) == 0].any()  # unmasked positions: exactly 0


@pytest.mark.parametrize("which", ["sft", "logprobs"])
def test_positions_past_the_last_needed_chunk_are_never_read(which):
    """With 2 positions per chunk and at most 3 masked positions in a row, only the first 2 chunks of the
    row-compacted layout run: NaN hidden states at positions that land past them leave every value and
    gradient finite (a dense pass would put 0 * NaN into dW)."""
    r = np.random.default_rng(9)
    t = 8
    m = np.zeros((2, t), np.float32)
    m[0, 5:] = 1.0  # compacted order 5, 6, 7, 0 | 1, 2, 3, 4
    m[1, 0] = 1.0  # 0, 1, 2, 3 | 4, 5, 6, 7
    skipped = np.zeros((2, t), bool)
    skipped[0, 1:5] = skipped[1, 4:] = True
    h = r.standard_normal((2, t, E)).astype(np.float32)
    clean = jnp.asarray(h)
    h[skipped] = np.nan
    h, m = jnp.asarray(h), jnp.asarray(m)
    w = jnp.asarray(r.standard_normal((E, V)), jnp.float32)
    y = jnp.asarray(r.integers(0, V, (2, t)), jnp.int32)

    if which == "sft":

        def f(h, w):
            return losses.chunked_sft_loss(h, w, y, m, chunk_size=4)[0]
    else:

        def f(h, w):
            return jnp.sum(losses.chunked_token_logprobs(h, w, y, mask=m, chunk_size=4))

    v, (dh, dw) = jax.value_and_grad(f, (0, 1))(h, w)
    v0, (dh0, dw0) = jax.value_and_grad(f, (0, 1))(clean, w)
    assert np.isfinite(np.asarray(dw)).all() and np.isfinite(np.asarray(dh)).all()
    _close((v, dh, dw), (v0, dh0, dw0), 1e-6)
    assert not np.asarray(dh)[skipped].any()


@pytest.mark.parametrize("bias", [False, True])
def test_bf16_logits_equal_plain_loss_on_bf16_rounded_logits(bias):
    """``logits_dtype=bf16`` (what the stages pass under bf16 compute, as an autocast LM head): the loss and
    log-probs of the logits rounded to bf16, reductions in f32."""
    h, w, b, y, m = _inputs(10, dtype=jnp.bfloat16, bias=bias)

    def rounded(h, w, b):
        z = einsum_f32_out("bte,ev->btv", h, w).astype(jnp.bfloat16).astype(jnp.float32)
        return z if b is None else z + b.astype(jnp.float32)

    l1, m1 = losses.chunked_sft_loss(h, w, y, m, bias=b, chunk_size=4, logits_dtype=jnp.bfloat16)
    l2, m2 = losses.sft_loss(rounded(h, w, b), y, m)
    _close((l1, m1), (l2, m2), 1e-5)
    lp1 = losses.chunked_token_logprobs(h, w, y, bias=b, mask=m, chunk_size=4, logits_dtype=jnp.bfloat16)
    lp2 = jnp.where(m > 0, losses.token_logprobs(rounded(h, w, b), y), 0.0)
    _close(lp1, lp2, 1e-5)
    g = jax.grad(lambda h: losses.chunked_sft_loss(h, w, y, m, bias=b, logits_dtype=jnp.bfloat16)[0])(h)
    g_ref = jax.grad(lambda h: losses.sft_loss(_plain_logits(h, w, b), y, m)[0])(h)
    _close(g, g_ref, 3e-2)  # the gradient of the bf16-rounded head is the head's gradient at bf16 precision


@pytest.mark.parametrize("masked", [False, True])
def test_vocab_major_kernel_equals_the_transposed_one(masked):
    """``vocab_major=True`` with ``W [V, E]`` gives the values and gradients of ``W.T`` in the default
    ``[E, V]`` layout (gradient in ``[V, E]``), for the SFT loss and the log-probs with entropy; a kernel
    whose E does not match is named in the error."""
    r = np.random.default_rng(4)
    b, t, e, v = 2, 37, 8, 50
    h = jnp.asarray(r.normal(size=(b, t, e)), jnp.float32)
    w = jnp.asarray(r.normal(size=(v, e)), jnp.float32)
    y = jnp.asarray(r.integers(0, v, (b, t)))
    m = jnp.asarray(r.random((b, t)) < 0.6, jnp.float32) if masked else jnp.ones((b, t), jnp.float32)

    def sft(h, w, vm):
        return losses.chunked_sft_loss(h, w, y, m, chunk_size=16, label_smoothing=0.1, vocab_major=vm)[0]

    def lp(h, w, vm):
        lp_, ent = losses.chunked_token_logprobs(
            h, w, y, mask=m if masked else None, chunk_size=16, return_entropy=True, vocab_major=vm
        )
        return jnp.sum(lp_) + 0.5 * jnp.sum(ent)

    for f in (sft, lp):
        a, (ga_h, ga_w) = jax.value_and_grad(f, (0, 1))(h, w, True)
        c, (gc_h, gc_w) = jax.value_and_grad(f, (0, 1))(h, w.T, False)
        np.testing.assert_allclose(float(a), float(c), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(ga_h), np.asarray(gc_h), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(ga_w), np.asarray(gc_w).T, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"kernel \[V, E\]"):
        losses.chunked_sft_loss(h, w.T, y, m, vocab_major=True)


@given(seed=st.integers(0, 10_000), ties=st.booleans(), masked=st.booleans())
def test_one_pass_max_argmax_lse_equals_the_three_reductions(seed, ties, masked):
    """The online (max, argmax, logsumexp) reduction == jnp.max / jnp.argmax (first index on ties) /
    logsumexp, with tied maxima and -inf entries (an all -inf row: max -inf, argmax 0, lse -inf)."""
    from jaxrlhf.losses._chunked import _max_argmax_lse

    r = np.random.default_rng(seed)
    z = r.normal(size=(3, 5, 999)).astype(np.float32) * 4
    if ties:
        z = np.round(z)  # many equal values, several tied maxima per row
    if masked:
        z[r.random(z.shape) < 0.3] = -np.inf
        z[1, 2] = -np.inf
    zmax, best, lse = jax.jit(_max_argmax_lse)(jnp.asarray(z))
    np.testing.assert_array_equal(np.asarray(zmax), z.max(-1))
    np.testing.assert_array_equal(np.asarray(best), z.argmax(-1))
    want = np.asarray(jax.nn.logsumexp(jnp.asarray(z), axis=-1))
    np.testing.assert_allclose(np.asarray(lse), want, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("tokens", [0, 1, 5])
def test_peeled_first_chunk_with_few_or_no_loss_tokens(tokens):
    """The first chunk runs before the loops (its weight gradient starts the accumulator): with no loss
    token at all, or fewer than one window, loss / log-probs and gradients still equal the plain ones."""
    r = np.random.default_rng(tokens)
    b, t = 2, 24
    h = jnp.asarray(r.standard_normal((b, t, E)), jnp.float32)
    w = jnp.asarray(r.standard_normal((E, V)), jnp.float32)
    y = jnp.asarray(r.integers(0, V, (b, t)), jnp.int32)
    m = np.zeros((b, t), np.float32)
    m[1, t - tokens :] = 1.0 if tokens else 0.0
    m = jnp.asarray(m)

    def plain_sft(h, w):
        return losses.sft_loss(jnp.einsum("bte,ev->btv", h, w), y, m)[0]

    def plain_lp(h, w):
        return jnp.sum(jnp.where(m > 0, losses.token_logprobs(jnp.einsum("bte,ev->btv", h, w), y), 0.0))

    for ours, ref in (
        (lambda h, w: losses.chunked_sft_loss(h, w, y, m, chunk_size=16)[0], plain_sft),
        (lambda h, w: jnp.sum(losses.chunked_token_logprobs(h, w, y, mask=m, chunk_size=16)), plain_lp),
    ):
        got = jax.value_and_grad(ours, (0, 1))(h, w)
        want = jax.value_and_grad(ref, (0, 1))(h, w)
        _close(got, want, 1e-5)
