"""The top-p radix passes as Pallas kernels (jaxrlhf._sampling_kernel), run in Pallas' interpreter on CPU:
the same threshold and nucleus mass as the XLA search (jaxrlhf._sampling._threshold) and the definition."""

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf._sampling import SamplingConfig, SearchMethod, _ordered_keys, _threshold, candidates
from jaxrlhf._sampling_kernel import _key_float, _signed_keys, top_p_threshold


@functools.cache
def _kernel(top_p: float, setting: tuple[int, ...]):
    return jax.jit(lambda x: top_p_threshold(x, top_p, interpret=True, setting=setting))


def _reference(x: np.ndarray, top_p: float):
    """tau by the XLA search and, from the definition in float64, the kept set and its mass."""
    keys = _ordered_keys(jnp.asarray(x))
    tau = np.asarray(_threshold(keys, jax.nn.softmax(jnp.asarray(x), axis=-1), jnp.float32(top_p)))
    p = np.exp(x.astype(np.float64) - x.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    more_likely = (p[:, None, :] * (x[:, None, :] > x[:, :, None])).sum(-1)  # [B, V]: mass above each token
    return tau, np.asarray(keys), more_likely < top_p, p


@hypothesis.settings(max_examples=14, deadline=None)
@hypothesis.given(
    seed=st.integers(0, 2**31 - 1),
    vocab=st.sampled_from(
        [16, 50, 301, 1000]
    ),  # blocks that do not divide the row: an overlapping last block
    scale=st.sampled_from([0.05, 0.5, 3.0, 30.0]),  # flat (a nucleus of most tokens) .. peaked (one or two)
    levels=st.sampled_from([0, 3, 40]),  # 0: continuous; else that many distinct values (ties)
    masked=st.booleans(),
    top_p=st.sampled_from([0.5, 0.9, 0.99]),
    setting=st.sampled_from(
        [
            (128, 4, 4, 1, 8),
            (32, 3, 4, 1, 1, 2, 1),
            (256, 8, 4, 1, 3),
            (64, 5, 4, 1, 2, 3, 0, 1),
            (128, 2, 4, 1, 8, 1, 1),
            (64, 4, 4, 1, 1, 1, 1),
            (32, 3, 4, 1, 8, 2, 1, 1),
        ]
    ),  # 3 or 5 groups (uneven splits), unroll 2 or 3 (blocks past the row), value grid, pred
)
def test_kernel_threshold_equals_the_xla_search(seed, vocab, scale, levels, masked, top_p, setting):
    rs = np.random.RandomState(seed)
    x = (rs.randn(3, vocab) * scale).astype(np.float32)
    if levels:
        x = np.floor(x * levels / (3 * scale)).astype(np.float32)
    if masked:
        x[:, rs.rand(vocab) < 0.4] = -np.inf
        x[:, 0] = np.maximum(x[:, 0], 0.0)  # every row keeps a finite token
    tau, mass = _kernel(top_p, setting)(jnp.asarray(x))
    want, keys, kept, p = _reference(x, top_p)
    np.testing.assert_array_equal(np.asarray(tau), want)
    np.testing.assert_array_equal(keys >= np.asarray(tau)[:, None], kept)  # == the definition's nucleus
    np.testing.assert_allclose(np.asarray(mass), (p * kept).sum(1), rtol=2e-6)


@pytest.mark.parametrize("setting", [(64, 4, 4, 1, 3, 1, 1), (64, 4, 4, 1, 8, 2, 1), (64, 4, 4, 1, 2, 2, 0)])
def test_programs_that_hold_no_finite_key(setting):
    """Pass 0's per-program max / finite min with programs whose blocks are all -inf, and rows whose max
    lies in one program only, give the XLA search's threshold and mass."""
    rs = np.random.RandomState(3)
    x = (rs.randn(4, 1000) * np.array([[0.1], [1.0], [5.0], [40.0]])).astype(np.float32)
    x[:, 250:750] = -np.inf  # programs 1 and 2 of 4 (256 keys each) see no finite key
    x[1, 900] = 60.0  # row 1's max far above every other program's
    tau, mass = _kernel(0.9, setting)(jnp.asarray(x))
    want, keys, kept, p = _reference(x, 0.9)
    np.testing.assert_array_equal(np.asarray(tau), want)
    np.testing.assert_allclose(np.asarray(mass), (p * kept).sum(1), rtol=2e-6)


@pytest.mark.parametrize(
    "case", ["flat", "peaked", "one_token", "ties", "constant", "outlier_min", "masked", "signed_zeros"]
)
def test_value_grid_first_pass_finds_the_threshold(case):
    """grid=1: the first pass' 16 values over [min, max] and 16-way splits of its bracket (of any width: one
    key, a few, most of the 2^32) give the XLA search's threshold and the nucleus mass (the radix passes
    too, last setting)."""
    rs = np.random.RandomState(11)
    x = rs.randn(3, 700).astype(np.float32)
    x = {
        "flat": x * 0.05,
        "peaked": x * 8.0,
        "one_token": np.where(np.arange(700) == 5, 50.0, x).astype(np.float32),  # j* = 0: the max alone
        "ties": np.floor(x * 2.0).astype(np.float32),
        "constant": np.full_like(x, 1.5),  # min == max: a zero grid step
        "outlier_min": np.where(np.arange(700) == 9, -3e38, x).astype(np.float32),  # a coarse grid
        "masked": np.where(rs.rand(3, 700) < 0.5, -np.inf, x).astype(np.float32),
        "signed_zeros": np.where(
            rs.rand(3, 700) < 0.4, np.float32(-0.0), np.where(rs.rand(3, 700) < 0.5, 0.0, x * 1e-3)
        ).astype(np.float32),  # +0 / -0 (one key) at the bracket's ends
    }[case]
    x[:, 0] = np.maximum(x[:, 0], 0.0)
    for setting in [(64, 4, 4, 1, 1, 1, 1), (64, 4, 4, 1, 8, 2, 1, 1), (64, 4, 4, 1, 2, 2, 0)]:
        tau, mass = _kernel(0.9, setting)(jnp.asarray(x))
        want, keys, kept, p = _reference(x, 0.9)
        np.testing.assert_array_equal(np.asarray(tau), want)
        np.testing.assert_allclose(np.asarray(mass), (p * kept).sum(1), rtol=2e-6)


def test_signed_keys_order_like_the_unsigned_keys():
    """The kernel's int32 keys compare (signed) exactly as _ordered_keys compare (unsigned), for signed
    zeros, infinities and extremes."""
    special = [0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, 3.4e38, -3.4e38, 1e-30, -1e-30, 0.5, -0.5]
    x = np.concatenate(
        [np.asarray(special, np.float32), np.random.RandomState(0).randn(200).astype(np.float32)]
    )
    s = np.asarray(_signed_keys(jnp.asarray(x)))
    u = np.asarray(_ordered_keys(jnp.asarray(x[None])))[0]
    np.testing.assert_array_equal(s[:, None] < s[None, :], u[:, None] < u[None, :])
    np.testing.assert_array_equal(s[:, None] == s[None, :], u[:, None] == u[None, :])
    np.testing.assert_array_equal(s.view(np.uint32) ^ np.uint32(0x80000000), u)


@pytest.mark.parametrize("kw", [dict(top_p=0.9), dict(top_k=40, top_p=0.8), dict(top_p=0.7, min_p=0.05)])
def test_candidates_with_the_kernel_equal_the_xla_candidates(kw):
    """candidates() through the kernels (interpreted) == through the XLA passes, after a top-k cut too."""
    x = jnp.asarray(np.random.RandomState(7).randn(4, 700).astype(np.float32) * 2)
    cfg = SamplingConfig(max_new_tokens=1, temperature=0.9, **kw)
    got = jax.jit(lambda z: candidates(z, cfg, method=SearchMethod(top_p_kernel="interpret"))[0])(x)
    want = jax.jit(lambda z: candidates(z, cfg, method=SearchMethod())[0])(x)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_gpu_kernel_falls_back_to_xla_off_gpu():
    """top_p_kernel="gpu" on a CPU backend runs the XLA passes (no Pallas call in the program)."""
    cfg = SamplingConfig(max_new_tokens=1, temperature=1.0, top_p=0.9)
    jaxpr = jax.make_jaxpr(lambda z: candidates(z, cfg, method=SearchMethod(top_p_kernel="gpu"))[0])(
        jnp.zeros((2, 64))
    )
    assert "pallas_call" not in str(jaxpr)
    jaxpr = jax.make_jaxpr(lambda z: candidates(z, cfg, method=SearchMethod(top_p_kernel="interpret"))[0])(
        jnp.zeros((2, 64))
    )
    assert "pallas_call" in str(jaxpr)


def test_a_kernel_that_does_not_compile_is_logged_and_reported_unavailable(monkeypatch, caplog):
    """available(): a compile failure (here: the CPU backend refusing non-interpreted Pallas) is a logged
    warning and False, so candidates() keeps the XLA passes instead of failing the run."""
    from jaxrlhf import _sampling_kernel as sk

    monkeypatch.setenv("JAXRLHF_TOPP_TUNING", "64,2,4,1,3")  # a setting of its own: a fresh cache entry
    with caplog.at_level("WARNING", logger="jaxrlhf.sampling"):
        assert sk.available() is False
    assert "do not compile here" in caplog.text and "64, 2, 4, 1, 3" in caplog.text


def test_float_compares_equal_key_compares():
    """The kernels compare floats: for every non-NaN f32 x and int32 key k (NaN bit patterns, the key -1 of
    no float too) ``x >= _key_float(k)`` <=> ``key(x) >= k``. Subnormal keys are left out: XLA:CPU flushes
    them to zero in compares (a GPU compare keeps them; benchmarks/topp_kernel_gpu.py checks rows of
    subnormals on the GPU)."""
    tiny = np.finfo(np.float32).tiny
    special = [0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, 3.4e38, -3.4e38, tiny, -tiny, 0.5, -0.5]
    x = np.concatenate(
        [np.asarray(special, np.float32), np.random.RandomState(1).randn(100).astype(np.float32)]
    )
    kx = np.asarray(_signed_keys(jnp.asarray(x)))
    ks = np.concatenate(
        [kx.astype(np.int64) + d for d in (0, 1, -1)]
        + [
            np.asarray([-(2**31), 2**31 - 1, -2139095041, -2139095042, -2139095040, 0x7F800000, 0x7F800001]),
            np.random.RandomState(2).randint(-(2**31), 2**31 - 1, 400),
        ]
    )
    ks = np.clip(ks, -(2**31), 2**31 - 1).astype(np.int32)
    mag = np.where(ks >= 0, ks, ks ^ np.int32(0x7FFFFFFF)) & np.int32(0x7FFFFFFF)  # |float| bits of each key
    ks = ks[(mag == 0) | (mag >= 0x00800000)]
    f = np.asarray(_key_float(jnp.asarray(ks)))
    with np.errstate(invalid="ignore"):
        np.testing.assert_array_equal(x[:, None] >= f[None, :], kx[:, None] >= ks[None, :])
