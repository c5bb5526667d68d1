"""Attention: `auto` resolution (logged), logged cuDNN fallback, mask construction, fused == plain (CPU)."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _hf_tiny import tiny_hf_config
from hypothesis import given
from hypothesis import strategies as st

from jaxrlhf import models
from jaxrlhf.models import _decode_attention, attention
from jaxrlhf.models.attention import attend, make_mask, resolve_attention_impl
from jaxrlhf.models.spec import ModelSpec


@pytest.fixture(autouse=True)
def _fresh_log_state():
    attention._LOGGED.clear()
    yield
    attention._LOGGED.clear()


@pytest.mark.parametrize(
    "impl,dtype,backend,want",
    [
        ("auto", jnp.bfloat16, "gpu", "fused"),
        ("auto", jnp.float16, "gpu", "fused"),
        ("auto", jnp.float32, "gpu", "plain"),
        ("auto", None, "gpu", "plain"),
        ("auto", jnp.bfloat16, "cpu", "plain"),
        ("auto", jnp.bfloat16, "tpu", "plain"),
        ("plain", jnp.bfloat16, "gpu", "plain"),
        ("fused", jnp.float32, "cpu", "fused"),
    ],
)
def test_resolve_attention_impl(impl, dtype, backend, want):
    assert resolve_attention_impl(impl, dtype, backend) == want


def test_auto_choice_is_logged_once_and_bad_names_raise(caplog):
    with caplog.at_level(logging.INFO, logger="jaxrlhf.attention"):
        for _ in range(3):
            resolve_attention_impl("auto", jnp.bfloat16, "gpu")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["attention_impl auto -> fused (bfloat16 on gpu)"]
    with pytest.raises(ValueError, match="attention_impl must be one of"):
        resolve_attention_impl("flash", jnp.bfloat16)


def _qkv(seed, b=2, t=6, s=6, h=4, k=2, d=8, dtype=jnp.float32):
    r = np.random.default_rng(seed)
    q = jnp.asarray(r.standard_normal((b, t, h, d)), dtype)
    kk = jnp.asarray(r.standard_normal((b, s, k, d)), dtype)
    v = jnp.asarray(r.standard_normal((b, s, k, d)), dtype)
    return q, kk, v


def test_cudnn_refusal_falls_back_to_xla_with_a_warning(monkeypatch, caplog):
    q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(0))
    real = jax.nn.dot_product_attention

    def fake(*args, implementation=None, **kw):
        if implementation == "cudnn":
            raise RuntimeError("cuDNN is not available")
        return real(*args, implementation=implementation, **kw)

    monkeypatch.setattr(attention.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(attention.jax.nn, "dot_product_attention", fake)
    with caplog.at_level(logging.WARNING, logger="jaxrlhf.attention"):
        out = attend(q, k, v, None, scale=0.3, impl="auto", is_causal=True)
        attend(q, k, v, None, scale=0.3, impl="auto", is_causal=True)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "cuDNN is not available" in warnings[0] and "XLA" in warnings[0]
    ref = attend(q, k, v, None, scale=0.3, impl="plain", is_causal=True)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=2e-2)


@given(seed=st.integers(0, 10_000), window=st.sampled_from([None, 1, 2, 4]))
def test_make_mask_equals_brute_force(seed, window):
    r = np.random.default_rng(seed)
    b, t = 2, 7
    seg = np.sort(r.integers(0, 3, (b, t)), axis=1)  # packed rows: contiguous segments, 0 = padding
    valid = seg != 0
    pos = np.zeros((b, t), np.int32)
    for i in range(b):
        for j in range(1, t):
            pos[i, j] = pos[i, j - 1] + 1 if seg[i, j] == seg[i, j - 1] else 0
    got = make_mask(jnp.arange(t), jnp.arange(t), jnp.asarray(valid), jnp.asarray(pos), jnp.asarray(pos),
                    window, jnp.asarray(seg), jnp.asarray(seg))  # fmt: skip
    want = np.zeros((b, 1, t, t), bool)
    for i in range(b):
        for qi in range(t):
            for ki in range(qi + 1):
                ok = valid[i, ki] and seg[i, qi] == seg[i, ki]
                if window is not None:
                    ok = ok and pos[i, qi] - pos[i, ki] < window
                want[i, 0, qi, ki] = ok
    np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("with_bias", [False, True])
def test_fused_xla_equals_plain_with_mask_and_bias(with_bias):
    q, k, v = _qkv(1)
    r = np.random.default_rng(2)
    seg = jnp.asarray([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]])
    mask = make_mask(jnp.arange(6), jnp.arange(6), seg != 0, q_segment=seg, kv_segment=seg)
    bias = jnp.asarray(r.standard_normal((2, 4, 6, 6)), jnp.float32) if with_bias else None
    plain = attend(q, k, v, mask, bias, scale=0.35, impl="plain")
    fused = attend(q, k, v, mask, bias, scale=0.35, impl="fused")
    real = np.asarray(seg != 0)  # padded queries attend to nothing: their outputs are not compared
    np.testing.assert_allclose(np.asarray(fused)[real], np.asarray(plain)[real], atol=1e-5)


@pytest.mark.parametrize(
    "b,s,h,kv,d", [(3, 64, 8, 2, 16), (2, 48, 4, 4, 32), (2, 32, 16, 1, 16), (1, 272, 4, 1, 64)]
)
def test_decode_kernel_equals_plain(b, s, h, kv, d):
    """The Pallas decode kernel (interpreted on CPU) == the plain path: random masks, a fully masked row
    (the plain softmax's uniform average over -1e30 scores), GQA / MHA / MQA, S not a multiple of 64."""
    q, k, v = _qkv(b * s + h, b=b, t=1, s=s, h=h, k=kv, d=d)
    r = np.random.default_rng(s)
    mask = jnp.asarray(r.random((b, 1, 1, s)) < 0.6).at[-1].set(False)
    ref = attend(q, k, v, mask, scale=d**-0.5, impl="plain")
    got = _decode_attention.decode_attention(q, k, v, mask, scale=d**-0.5, interpret=True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=2e-6)
    # bf16: within the plain path's own bf16 rounding of the probabilities
    qb, kb, vb = (x.astype(jnp.bfloat16) for x in (q, k, v))
    ref_b = attend(qb, kb, vb, mask, scale=d**-0.5, impl="plain")
    got_b = _decode_attention.decode_attention(qb, kb, vb, mask, scale=d**-0.5, interpret=True)
    assert got_b.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got_b, np.float32), np.asarray(ref_b, np.float32), atol=2e-2)


def test_decode_kernel_dispatch(monkeypatch, caplog):
    """``attend(impl="fused")`` sends a one-token bf16 query with a mask on a GPU to the decode kernel
    (logged once), and keeps cuDNN / XLA for prompts, biases, f32 and head dims the kernel does not serve."""
    calls = []
    real = _decode_attention.decode_attention

    def interpreted(q, k, v, mask, *, scale):
        calls.append(q.shape)
        return real(q, k, v, mask, scale=scale, interpret=True)

    monkeypatch.setattr(attention.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(_decode_attention, "decode_attention", interpreted)
    q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(3, t=1, s=32, d=16))
    mask = jnp.ones((2, 1, 1, 32), bool).at[0, ..., :5].set(False)
    with caplog.at_level(logging.INFO, logger="jaxrlhf.attention"):
        out = attend(q, k, v, mask, scale=0.3, impl="fused")
        attend(q, k, v, mask, scale=0.3, impl="fused")
    assert calls == [q.shape, q.shape]
    assert [r.getMessage() for r in caplog.records if "decode kernel" in r.getMessage()] == [
        f"attention: decode step q {q.shape} over cache {k.shape} bfloat16 -> the fused decode kernel"
    ]
    ref = attend(q, k, v, mask, scale=0.3, impl="plain")
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=2e-2)
    assert not _decode_attention.supported((2, 4, 4, 8), (2, 32, 2, 8), jnp.bfloat16)  # a prompt (T > 1)
    assert not _decode_attention.supported((2, 1, 4, 16), (2, 32, 2, 16), jnp.float32)
    assert not _decode_attention.supported((2, 1, 4, 80), (2, 32, 2, 80), jnp.bfloat16)  # head dim 80
    assert not _decode_attention.supported((2, 1, 4, 16), (2, 40, 2, 16), jnp.bfloat16)  # S % 16
    calls.clear()
    bias = jnp.zeros((2, 4, 1, 32), jnp.float32)
    attend(q, k, v, mask, bias, scale=0.3, impl="fused")  # ALiBi: the bias path
    assert calls == []


@pytest.mark.parametrize("kv", [4, 1])
def test_decode_kernel_on_a_mesh_runs_per_shard(monkeypatch, caplog, kv):
    """Under a data x fsdp x tensor mesh the decode kernel runs per shard (shard_map over batch and heads)
    and equals the plain path; an MQA cache (1 kv head) cannot follow q's tensor-sharded heads, so that case
    keeps the XLA path (logged), never a wrong grouping."""
    from jaxrlhf import sharding

    calls = []
    real = _decode_attention.decode_attention

    def interpreted(q, k, v, mask, *, scale):
        calls.append((q.shape, k.shape))
        return real(q, k, v, mask, scale=scale, interpret=True)

    monkeypatch.setattr(attention.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(_decode_attention, "decode_attention", interpreted)
    q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(5, b=4, t=1, s=32, h=8, k=kv, d=16))
    mask = jnp.ones((4, 1, 1, 32), bool).at[1, ..., :7].set(False)
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    with caplog.at_level(logging.INFO, logger="jaxrlhf.attention"), sharding.use_mesh(mesh):
        out = jax.jit(lambda q, k, v, m: attend(q, k, v, m, scale=0.25, impl="fused"))(q, k, v, mask)
    ref = attend(q, k, v, mask, scale=0.25, impl="plain")
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=2e-2)
    if kv == 4:
        assert calls == [((1, 1, 4, 16), (1, 32, 2, 16))]  # per shard: batch / 4, heads / 2
    else:
        assert calls == [] and any("shard differently" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("name", ["llama3", "mistral", "bloom"])
def test_decoder_auto_and_fused_equal_plain_logits(name):
    spec = ModelSpec.from_hf_config(tiny_hf_config(name).to_dict())
    if name == "mistral":
        spec = spec.replace(sliding_window=3)
    params = models.init_params(spec, jax.random.key(0))
    ids = jnp.asarray(np.random.default_rng(3).integers(3, 100, (2, 8)), jnp.int32)
    seg = jnp.asarray([[1, 1, 1, 2, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    pos = jnp.asarray([[0, 1, 2, 0, 1, 2, 3, 0], list(range(8))])
    kw = dict(positions=pos, segment_ids=seg)
    plain = models.forward(spec, params, ids, **kw, attention_impl="plain").logits
    real = np.asarray(seg != 0)
    for impl in ("auto", "fused"):
        other = models.forward(spec, params, ids, **kw, attention_impl=impl).logits
        np.testing.assert_allclose(np.asarray(other)[real], np.asarray(plain)[real], atol=1e-5)


def _runs_reference(seg_row):
    """(lengths, starts, real runs) of one row, in numpy: a run of one nonzero id, with the padding after it;
    padding before the first real token is a run of its own."""
    runs, starts, prev, real = [], [], 0, 0
    for j, x in enumerate(seg_row):
        if (x != 0 and x != prev) or j == 0:
            runs.append(0)
            starts.append(j)
            real += int(x != 0)
        runs[-1] += 1
        prev = x
    return runs, starts, real


@given(seed=st.integers(0, 10_000), m=st.integers(1, 5))
def test_segment_layout_equals_numpy_runs(seed, m):
    r = np.random.default_rng(seed)
    b, t = 3, 12
    seg = np.zeros((b, t), np.int32)
    for i in range(b):  # packed rows: increasing ids, optional padding gaps, padded tail
        cur, j = 0, 0
        while j < t:
            n = int(r.integers(1, 5))
            cur += int(r.integers(1, 3))
            seg[i, j : j + n] = 0 if r.random() < 0.2 else cur
            j += n
    seg[0, -3:] = 0
    lay = attention.segment_layout(jnp.asarray(seg), m)
    cols = max(m, 2)
    assert lay.seqlen.shape == (b, cols) and lay.offsets.shape == (b, cols + 1)
    for i in range(b):
        lengths, starts, real = _runs_reference(seg[i])
        ok = real <= m and len(lengths) <= cols
        assert bool(lay.ok[i]) == ok
        if ok:
            np.testing.assert_array_equal(np.asarray(lay.seqlen[i]), (lengths + [-1] * cols)[:cols])
            np.testing.assert_array_equal(
                np.asarray(lay.offsets[i]), (starts + [-1] * (cols + 1))[: cols + 1]
            )
            assert sum(lengths) == t  # every slot lies in a segment
            # for the real tokens the dense view equals make_mask's (positions restart per run); they never
            # see a padding slot
            pos = np.zeros(t, np.int32)
            for j in range(1, t):
                pos[j] = pos[j - 1] + 1 if seg[i, j] != 0 and seg[i, j] == seg[i, j - 1] else 0
            want = make_mask(jnp.arange(t), jnp.arange(t), jnp.asarray(seg[i : i + 1] != 0), None, None, None,
                             jnp.asarray(seg[i : i + 1]), jnp.asarray(seg[i : i + 1]))  # fmt: skip
            real_q = seg[i] != 0
            got = np.asarray(lay.dense_mask()[i, 0])
            np.testing.assert_array_equal(got[real_q], np.asarray(want)[0, 0][real_q])
            assert got.any(axis=1).all()  # every query (padding too) sees at least itself: finite outputs


def test_segment_layout_flags_repeated_ids_and_overflow():
    seg = jnp.asarray([[1, 1, 2, 2, 1, 0], [1, 0, 1, 1, 2, 2], [1, 2, 3, 4, 0, 0], [0, 0, 1, 1, 1, 0]])
    lay = attention.segment_layout(seg, 3)
    np.testing.assert_array_equal(np.asarray(lay.ok), [False, False, False, True])  # id 1 twice x2; 4 runs
    np.testing.assert_array_equal(np.asarray(lay.offsets[3]), [0, 2, -1, -1])  # left padding: a run
    np.testing.assert_array_equal(np.asarray(lay.seqlen[3]), [2, 4, -1])  # the tail joins the last run
    # a left-padded row with max_segments (>= 2) real runs needs one column too many
    lay = attention.segment_layout(jnp.asarray([[0, 1, 1, 2, 2, 0]]), 2)
    np.testing.assert_array_equal(np.asarray(lay.ok), [False])


@pytest.mark.parametrize("name", ["llama3", "mistral"])
def test_decoder_segment_layout_equals_dense_mask(name):
    """forward(max_segments=) on the fused path == the dense-mask plain path: packed, right- and
    left-padded rows, sliding window; a row that breaks the promise is NaN, the others unaffected."""
    spec = ModelSpec.from_hf_config(tiny_hf_config(name).to_dict())
    if name == "mistral":
        spec = spec.replace(sliding_window=3)
    params = models.init_params(spec, jax.random.key(0))
    ids = jnp.asarray(np.random.default_rng(3).integers(3, 100, (3, 8)), jnp.int32)
    seg = jnp.asarray([[1, 1, 1, 2, 2, 2, 2, 0], [1, 2, 2, 3, 3, 3, 4, 4], [1, 1, 1, 1, 1, 1, 1, 1]])
    pos = jnp.asarray([[0, 1, 2, 0, 1, 2, 3, 0], [0, 0, 1, 0, 1, 2, 0, 1], list(range(8))])
    plain = models.forward(spec, params, ids, positions=pos, segment_ids=seg, attention_impl="plain").logits
    real = np.asarray(seg != 0)
    got = models.forward(
        spec, params, ids, positions=pos, segment_ids=seg, attention_impl="fused", max_segments=4
    ).logits
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(plain)[real], atol=1e-5)
    # attention_mask only (left and right padding), one segment per row
    am = jnp.asarray([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0, 0], [1] * 8])
    plain = models.forward(spec, params, ids, am, attention_impl="plain").logits
    got = models.forward(spec, params, ids, am, attention_impl="fused", max_segments=1).logits
    real = np.asarray(am != 0)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(plain)[real], atol=1e-5)
    # row 1 has 4 segments > 3: NaN; rows 0 and 2 unchanged
    got = models.forward(
        spec, params, ids, positions=pos, segment_ids=seg, attention_impl="fused", max_segments=3
    ).logits
    assert np.isnan(np.asarray(got)[1]).all() and np.isfinite(np.asarray(got)[[0, 2]]).all()


def _pairs(rng, b, prefix, conts):
    """Random shared-prefix pairs: (packed ids [B, L], layout, the two rows [B, V] each + their lengths)."""
    s = np.asarray(prefix)
    n1, n2 = np.asarray(conts[0]), np.asarray(conts[1])
    a, e = s + n1, s + n1 + n2
    length, vl = int(e.max()) + 1, int(max((s + n1).max(), (s + n2).max()))
    packed = np.zeros((b, length), np.int32)
    rows = np.zeros((2, b, vl), np.int32)
    for i in range(b):
        p, c1, c2 = (rng.integers(3, 100, n) for n in (s[i], n1[i], n2[i]))
        packed[i, : e[i]] = np.concatenate([p, c1, c2])
        rows[0, i, : a[i]] = np.concatenate([p, c1])
        rows[1, i, : s[i] + n2[i]] = np.concatenate([p, c2])
    lay = attention.PairLayout(jnp.asarray(s), jnp.asarray(a), jnp.asarray(e), virtual_len=vl)
    return jnp.asarray(packed), lay, rows, (s + n1, s + n2)


@pytest.mark.parametrize("name", ["mistral", "bloom", "gpt2"])
def test_pair_layout_equals_the_two_rows(name):
    """forward(pair_layout=) on packed [prefix | cont 1 | cont 2] rows: every token's logits equal those of
    the separate rows [prefix, cont] (plain = dense pair mask; fused on CPU = the virtual rows through the
    custom-VJP gathers), and (mistral: RoPE + sliding window) so do the gradients of a loss on them; BLOOM:
    ALiBi, GPT-2: learned positions; rows with an empty prefix / continuation too."""
    spec = ModelSpec.from_hf_config(tiny_hf_config(name).to_dict())
    if name == "mistral":
        spec = spec.replace(sliding_window=3)
    params = models.init_params(spec, jax.random.key(0))
    rng = np.random.default_rng(5)
    packed, lay, rows, lens = _pairs(rng, 4, [3, 1, 0, 4], ([4, 2, 3, 0], [2, 5, 3, 3]))
    b, length = packed.shape
    s, a, e = (np.asarray(x) for x in (lay.shared, lay.split, lay.end))
    part = lay.part(length)
    # where each token of the two rows sits in the packed row
    where = [
        [list(range(a[i])) for i in range(b)],
        [list(range(s[i])) + list(range(a[i], e[i])) for i in range(b)],
    ]
    w = jnp.asarray(np.random.default_rng(6).normal(size=(spec.vocab_size,)), jnp.float32)
    masks = [
        jnp.asarray(np.arange(r.shape[1])[None, :] < n[:, None], jnp.int32)
        for r, n in zip(rows, lens, strict=True)
    ]

    @jax.jit
    def separate(p):  # logits of the two rows and a loss on them
        out = [
            models.forward(spec, p, jnp.asarray(r), m, attention_impl="plain").logits
            for r, m in zip(rows, masks, strict=True)
        ]
        return out, sum(
            jnp.sum(jnp.where(m[..., None] > 0, jnp.tanh(lg) * w, 0.0))
            for lg, m in zip(out, masks, strict=True)
        )

    def packed_fn(impl):
        def f(p):
            lg = models.forward(spec, p, packed, attention_impl=impl, pair_layout=lay).logits
            # prefix tokens belong to both rows (counted twice), continuation tokens to one
            weight = jnp.where(part == 0, 2.0, jnp.where(part > 0, 1.0, 0.0))
            return lg, jnp.sum(jnp.tanh(lg) * w * weight[..., None])

        return jax.jit(f)

    ref_logits, _ = separate(params)
    with_grad = name == "mistral"
    if with_grad:
        ref_grad = jax.jit(jax.grad(lambda p: separate(p)[1]))(params)
    for impl in ("plain", "fused"):
        got = np.asarray(packed_fn(impl)(params)[0])
        for r in range(2):
            for i in range(b):
                np.testing.assert_allclose(
                    got[i, where[r][i]], np.asarray(ref_logits[r])[i, : len(where[r][i])], atol=1e-5
                )
        assert np.isfinite(got[np.asarray(part >= 0)]).all()
        if with_grad:
            grad = jax.jit(jax.grad(lambda p, impl=impl: packed_fn(impl)(p)[1]))(params)
            for g, r in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad), strict=True):
                np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=2e-5, rtol=1e-4)


def test_pair_layout_rows_breaking_the_contract_are_nan():
    spec = ModelSpec.from_hf_config(tiny_hf_config("llama3").to_dict())
    params = models.init_params(spec, jax.random.key(0))
    packed, lay, _, _ = _pairs(np.random.default_rng(1), 2, [2, 2], ([3, 3], [3, 3]))
    bad = attention.PairLayout(lay.shared, lay.split, lay.end.at[1].set(99), virtual_len=lay.virtual_len)
    short = attention.PairLayout(lay.shared, lay.split, lay.end, virtual_len=4)  # 5 > V for both rows
    for impl in ("plain", "fused"):
        fn = jax.jit(
            lambda p, lay, impl=impl: (
                models.forward(spec, p, packed, attention_impl=impl, pair_layout=lay).logits
            )
        )
        got = np.asarray(fn(params, bad))
        assert np.isnan(got[1]).all() and np.isfinite(got[0]).all()
        assert np.isnan(np.asarray(fn(params, short))).all()
