"""Exactness of the sampling transforms against distributions written in numpy from their definitions."""

import dataclasses
import functools
import math

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf._sampling import (
    METHODS,
    SamplingConfig,
    SearchMethod,
    _ordered_keys,
    _threshold,
    candidates,
    sample,
    sampling_probs,
)
from tests._jaxpr import all_eqns

LOGITS = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, 0.3, 1.2, -2.0], np.float32)
DRAWS = 40_000


def reference_probs(z, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, banned=()):
    """The sampling distribution by definition: softmax(z/T), then top-k, top-p, min-p cuts, renormalised."""
    z = np.asarray(z, np.float64).copy()
    z[list(banned)] = -np.inf
    p = np.exp((z - z.max()) / temperature)
    p /= p.sum()
    keep = p > 0
    if top_k and top_k < z.size:
        keep &= z >= np.sort(z)[::-1][top_k - 1]  # ties with the k-th largest stay (transformers' TopK)
    if top_p < 1.0:
        q = np.where(keep, p, 0.0)
        q /= q.sum()
        more_likely = np.array([q[z > z[i]].sum() for i in range(z.size)])
        keep &= more_likely < top_p
    if min_p > 0.0:
        q = np.where(keep, p, 0.0)
        keep &= q >= min_p * q.max()
    out = np.where(keep, p, 0.0)
    return out / out.sum()


def chi_square_threshold(df: int, z: float = 4.0) -> float:
    """Upper quantile of chi-square(df) at a normal z-score (Wilson-Hilferty); z=4 ~ p=3e-5."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@functools.cache
def _sampler(cfg: SamplingConfig, stop_ids=(), allow_stop=True, method=None):
    return jax.jit(
        lambda z, rng: sample(z, rng, cfg, stop_ids=stop_ids, allow_stop=allow_stop, method=method)
    )


def _draw(cfg, seed=0, stop_ids=(), allow_stop=True, method=None, logits=LOGITS):
    z = jnp.broadcast_to(jnp.asarray(logits), (DRAWS, logits.size))
    tokens, logprobs, raw = _sampler(cfg, stop_ids, allow_stop, method)(z, jax.random.key(seed))
    return np.asarray(tokens), np.asarray(logprobs), np.asarray(raw)


def _check_distribution(tokens, expected):
    counts = np.bincount(tokens, minlength=expected.size)
    support = expected > 0
    assert counts[~support].sum() == 0, f"sampled outside the support: {np.nonzero(counts * ~support)}"
    e = expected[support] * tokens.size
    chi2 = float(((counts[support] - e) ** 2 / e).sum())
    df = int(support.sum()) - 1
    if df > 0:
        assert chi2 < chi_square_threshold(df), f"chi2={chi2:.1f} df={df}"
    tv = 0.5 * np.abs(counts / tokens.size - expected).sum()
    assert tv < 0.02, tv


CASES = [
    dict(temperature=1.0),
    dict(temperature=0.6),
    dict(temperature=1.0, top_k=3),
    dict(temperature=1.0, top_p=0.8),
    dict(temperature=1.4, top_k=6, top_p=0.7),
    dict(temperature=1.0, min_p=0.25),
    dict(temperature=0.8, top_p=0.9, min_p=0.1),
]


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_empirical_frequencies_match_truncated_softmax(kw):
    cfg = SamplingConfig(max_new_tokens=1, **kw)
    expected = reference_probs(LOGITS, **kw)
    tokens, logprobs, raw = _draw(cfg)
    _check_distribution(tokens, expected)
    # log-probs are those of the distribution the tokens came from, and of the raw model
    np.testing.assert_allclose(np.exp(logprobs), expected[tokens], rtol=1e-5)
    log_softmax = LOGITS - np.log(np.exp(LOGITS.astype(np.float64)).sum())
    np.testing.assert_allclose(raw, log_softmax[tokens], atol=1e-6)
    # the diagnostic dense form agrees with the definition too
    dense = np.asarray(sampling_probs(jnp.asarray(LOGITS)[None], cfg))[0]
    np.testing.assert_allclose(dense, expected, atol=1e-6)


def test_greedy_is_argmax_and_reports_model_logprob():
    cfg = SamplingConfig(max_new_tokens=1, temperature=0.0)
    tokens, logprobs, raw = _draw(cfg)
    assert (tokens == LOGITS.argmax()).all()
    np.testing.assert_allclose(logprobs, raw, atol=0)
    np.testing.assert_allclose(raw, LOGITS[0] - np.log(np.exp(LOGITS.astype(np.float64)).sum()), atol=1e-6)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_min_new_tokens_bans_stop_tokens(temperature):
    stop = (0, 8)  # the two most likely tokens
    cfg = SamplingConfig(max_new_tokens=4, min_new_tokens=2, temperature=temperature)
    tokens, logprobs, raw = _draw(cfg, stop_ids=stop, allow_stop=False)
    expected = reference_probs(LOGITS, temperature=max(temperature, 1.0), banned=stop)
    if temperature == 0.0:
        assert (tokens == 1).all()
    else:
        _check_distribution(tokens, expected)
        np.testing.assert_allclose(np.exp(logprobs), expected[tokens], rtol=1e-5)
    # allowed again: the stop tokens come back
    tokens, _, _ = _draw(cfg, stop_ids=stop, allow_stop=True)
    assert (tokens == 0).mean() > (0.99 if temperature == 0.0 else 0.2)


def test_rows_draw_independently_and_seeds_matter():
    cfg = SamplingConfig(max_new_tokens=1, temperature=1.0)
    a, _, _ = _draw(cfg, seed=1)
    b, _, _ = _draw(cfg, seed=2)
    assert (a != b).mean() > 0.5
    assert len(set(a[:50].tolist())) > 3


@hypothesis.settings(max_examples=10)
@hypothesis.given(
    seed=st.integers(0, 2**31 - 1), k=st.sampled_from([1, 3, 7]), temperature=st.sampled_from([0.5, 2.0])
)
def test_top_k_never_samples_outside_the_k_most_likely(seed, k, temperature):
    rs = np.random.RandomState(seed)
    z = jnp.asarray(rs.randn(64, 16).astype(np.float32) * 3)
    cfg = SamplingConfig(max_new_tokens=1, temperature=temperature, top_k=k)
    tokens, logprobs, _ = _sampler(cfg)(z, jax.random.key(seed))
    rank = (np.asarray(z) > np.take_along_axis(np.asarray(z), np.asarray(tokens)[:, None], 1)).sum(1)
    assert (rank < k).all()
    assert (np.asarray(logprobs) <= 0).all()


def test_config_is_hashable_and_validates():
    a = SamplingConfig(max_new_tokens=8, stop_token_ids=[3, 4])
    assert a.stop_token_ids == (3, 4) and hash(a) == hash(
        SamplingConfig(max_new_tokens=8, stop_token_ids=(3, 4))
    )
    for bad in [
        dict(max_new_tokens=0),
        dict(max_new_tokens=4, temperature=-1.0),
        dict(max_new_tokens=4, top_p=0.0),
        dict(max_new_tokens=4, top_k=-2),
        dict(max_new_tokens=4, min_p=1.0),
        dict(max_new_tokens=4, min_new_tokens=5),
        dict(max_new_tokens=4, n=0),
    ]:
        with pytest.raises(ValueError, match="SamplingConfig"):
            SamplingConfig(**bad)


def _hf_warped(z: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """transformers' own logits warpers (Temperature -> TopK -> TopP, generate's order) on rows of ``z``."""
    torch = pytest.importorskip("torch")
    from transformers.generation import logits_process as lp

    scores = torch.as_tensor(z, dtype=torch.float32)
    warpers = [lp.TemperatureLogitsWarper(temperature)]
    if top_k:
        warpers.append(lp.TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(lp.TopPLogitsWarper(top_p))
    for w in warpers:
        scores = w(None, scores)
    return scores.numpy()


@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(
    seed=st.integers(0, 2**31 - 1),
    vocab=st.sampled_from([7, 50, 301]),
    temperature=st.sampled_from([0.7, 1.0, 1.3]),
    top_k=st.sampled_from([0, 1, 5, 40]),
    top_p=st.sampled_from([1.0, 0.5, 0.9, 0.99]),
    ties=st.booleans(),
)
def test_truncation_equals_transformers_warpers(seed, vocab, temperature, top_k, top_p, ties):
    """Kept set and renormalised distribution == transformers' TopK / TopP warpers (ties: top-k only, where
    transformers keeps every token tied with the k-th; its top-p orders tied tokens arbitrarily)."""
    rs = np.random.RandomState(seed)
    z = rs.randn(6, vocab).astype(np.float32) * 3
    if ties:
        z = np.round(z)  # many equal logits
        top_p = 1.0
    cfg = SamplingConfig(max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p)
    ours, _ = jax.jit(lambda x: candidates(x, cfg))(jnp.asarray(z))
    ours = np.asarray(ours)
    hf = _hf_warped(z, temperature, top_k, top_p)
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(hf))
    p_ours = np.asarray(jax.nn.softmax(jnp.asarray(ours), axis=-1))
    p_hf = np.exp(hf - hf.max(1, keepdims=True))
    np.testing.assert_allclose(p_ours, p_hf / p_hf.sum(1, keepdims=True), atol=1e-6)


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(
    values=st.lists(
        st.one_of(
            st.floats(allow_nan=False, width=32),
            st.sampled_from([0.0, -0.0, 1.0, -1.0, float("-inf"), float("inf"), 1e-45, -1e-45]),
        ),
        min_size=1,
        max_size=40,
    ),
    data=st.data(),
)
def test_threshold_is_the_exact_kth_largest(values, data):
    """_threshold with unit weights returns the key of the k-th largest value for any floats (signed zeros,
    infinities, denormals, duplicates), and the key order is the float order (equal floats, equal keys)."""
    x = np.asarray(values, np.float32)
    k = data.draw(st.integers(1, x.size))
    keys = np.asarray(_ordered_keys(jnp.asarray(x[None])))[0]
    x = np.where(np.abs(x) < np.finfo(np.float32).tiny, np.float32(0), x)  # XLA flushes denormals to 0
    lt, eq = x[:, None] < x[None, :], x[:, None] == x[None, :]
    np.testing.assert_array_equal(keys[:, None] < keys[None, :], lt)
    np.testing.assert_array_equal(keys[:, None] == keys[None, :], eq)
    tau = int(_threshold(jnp.asarray(keys[None]), jnp.ones((1, x.size)), jnp.float32(k))[0])
    assert tau == int(np.sort(keys)[::-1][k - 1])


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("kw", [dict(top_k=50), dict(top_k=3), dict(top_p=0.9), dict(top_k=50, top_p=0.9)])
def test_truncation_sorts_nothing(kw, method):
    """No sort / top_k primitive over the vocabulary in the sampler (it ran a full sort per decode step)."""
    cfg = SamplingConfig(max_new_tokens=1, temperature=1.0, **kw)
    f = lambda z, r: sample(z, r, cfg, method=method)
    jaxpr = jax.make_jaxpr(f)(jnp.zeros((4, 1000)), jax.random.key(0))
    names = {e.primitive.name for e in all_eqns(jaxpr.jaxpr)}
    assert not names & {"sort", "top_k", "approx_top_k"}, names


@functools.cache
def _kth_jit(k: int, chunk: int):
    from jaxrlhf._sampling import kth_largest_key

    return jax.jit(lambda x: kth_largest_key(x, k, chunk))


@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(
    seed=st.integers(0, 2**31 - 1),
    vocab=st.sampled_from([130]),  # a padded last chunk for both chunk sizes; one compile per (k, chunk)
    k=st.sampled_from([1, 6]),
    chunk=st.sampled_from([3, 8]),
    levels=st.sampled_from([0, 3, 1000]),  # 0: continuous values; else that many distinct values (ties)
    masked=st.booleans(),
)
def test_two_level_kth_largest_is_exact(seed, vocab, k, chunk, levels, masked):
    """kth_largest_key (chunk maxima, then a search over k chunks) == the k-th largest key of the row, with
    ties across chunks (the tied-maximum chunks not kept), -inf runs and a padded last chunk."""
    rs = np.random.RandomState(seed)
    z = rs.randn(5, vocab).astype(np.float32)
    if levels:
        z = np.floor(z * levels / 3).astype(np.float32)
    if masked:
        z[:, rs.rand(vocab) < 0.5] = -np.inf
    keys = _ordered_keys(jnp.asarray(z))
    got = np.asarray(_kth_jit(k, chunk)(keys))
    want = np.sort(np.asarray(keys), axis=1)[:, ::-1][:, k - 1]
    np.testing.assert_array_equal(got, want)


# ------------------------------------------------ the search methods: the reference's thresholds, other draws

METHOD_CFGS = [
    SamplingConfig(max_new_tokens=1, temperature=0.8, top_k=3),  # the chunk levels: 8 chunks of 128 >= 2k
    SamplingConfig(max_new_tokens=1, temperature=1.0, top_p=0.9),
]


def _search_variants() -> dict[str, SearchMethod]:
    """METHODS' distinct searches (the draw does not change the candidates), plus a 3-bit radix and rank
    counting at a size this 1000-token row reaches; the reference left out."""
    out = {}
    extra = {"radix3": SearchMethod(radix_bits=3), "rank64": SearchMethod(rank_below=64, inner_chunks=(8,))}
    for name, m in sorted({**METHODS, **extra}.items()):
        v = dataclasses.replace(m, draw="gumbel")
        if v != SearchMethod() and v not in out.values():
            out[name] = v
    return out


@functools.cache
def _candidates_jit(cfg: SamplingConfig, method):
    return jax.jit(lambda z: candidates(z, cfg, method=method)[0])


@hypothesis.settings(max_examples=8, deadline=None)
@hypothesis.given(
    seed=st.integers(0, 2**31 - 1),
    scale=st.sampled_from([0.05, 0.5, 3.0, 30.0]),  # flat (huge nucleus) .. peaked (a few tokens)
    levels=st.sampled_from([0, 2, 40]),  # 0: continuous; else that many distinct values (ties)
    masked=st.booleans(),
)
def test_every_method_keeps_the_reference_set(seed, scale, levels, masked):
    """Every :data:`METHODS` search returns the reference ("radix") candidates for top-k and top-p, on flat
    and peaked rows, with ties (also across chunks) and -inf runs; one compile per (config, method). Top-k
    counts are integers, so the thresholds are equal by construction; top-p sums may add in another order,
    so a row could differ only at a boundary within float rounding (none does on these draws)."""
    rs = np.random.RandomState(seed)
    z = rs.randn(6, 1000).astype(np.float32) * scale
    if levels:
        z = np.floor(z * levels / (3 * scale)).astype(np.float32)
    if masked:
        z[:, rs.rand(1000) < 0.3] = -np.inf
    for cfg in METHOD_CFGS:
        want = np.asarray(_candidates_jit(cfg, "radix")(jnp.asarray(z)))
        for name, method in _search_variants().items():
            got = np.asarray(_candidates_jit(cfg, method)(jnp.asarray(z)))
            np.testing.assert_array_equal(got, want, err_msg=f"{name} {cfg}")


@pytest.mark.parametrize("method", ["cdf"])  # the draw is one code path; the searches are tested above
def test_cdf_draw_frequencies_match_truncated_softmax(method):
    """The inverse-CDF draw: frequencies and reported log-probs == the definition, over several chunks (a
    300-token row: two chunks of 128 and a padded one) with excluded tokens inside each chunk."""
    logits = np.random.RandomState(3).randn(300).astype(np.float32) * 2
    logits[::7] = -np.inf  # banned tokens scattered through every chunk
    for kw in (dict(temperature=1.0), dict(temperature=0.7, top_k=20), dict(temperature=1.0, top_p=0.8)):
        cfg = SamplingConfig(max_new_tokens=1, **kw)
        expected = reference_probs(logits, **kw)
        tokens, logprobs, raw = _draw(cfg, seed=5, method=method, logits=logits)
        _check_distribution(tokens, expected)
        np.testing.assert_allclose(np.exp(logprobs), expected[tokens], rtol=1e-5)
        z64 = logits.astype(np.float64)
        log_softmax = z64 - np.log(np.exp(z64[np.isfinite(z64)]).sum())
        np.testing.assert_allclose(raw, log_softmax[tokens], atol=1e-5)


def test_cdf_draw_on_the_small_vocabulary_cases():
    """The cdf draw on CASES (one chunk, padded): the same frequencies as the Gumbel draw's test."""
    for kw in CASES[2:5]:
        cfg = SamplingConfig(max_new_tokens=1, **kw)
        tokens, logprobs, _ = _draw(cfg, seed=9, method="cdf")
        _check_distribution(tokens, reference_probs(LOGITS, **kw))
        np.testing.assert_allclose(np.exp(logprobs), reference_probs(LOGITS, **kw)[tokens], rtol=1e-5)


@functools.cache
def _kth_rank_jit(k: int, chunk: int, inner: tuple[int, ...]):
    from jaxrlhf._sampling import kth_largest_key

    return jax.jit(lambda x: kth_largest_key(x, k, chunk, radix_bits=3, rank_below=64, inner_chunks=inner))


@hypothesis.settings(max_examples=15, deadline=None)
@hypothesis.given(
    seed=st.integers(0, 2**31 - 1),
    k=st.sampled_from([1, 4]),
    inner=st.sampled_from([(), (3,)]),
    levels=st.sampled_from([0, 3, 1000]),
    masked=st.booleans(),
)
def test_rank_count_and_inner_levels_are_exact(seed, k, inner, levels, masked):
    """kth_largest_key with the counting base case (_kth_by_rank), 3-bit passes and a second chunk level ==
    the k-th largest key, with ties across chunks and -inf runs."""
    rs = np.random.RandomState(seed)
    z = rs.randn(5, 300).astype(np.float32)
    if levels:
        z = np.floor(z * levels / 3).astype(np.float32)
    if masked:
        z[:, rs.rand(300) < 0.5] = -np.inf
    keys = _ordered_keys(jnp.asarray(z))
    got = np.asarray(_kth_rank_jit(k, 8, inner)(keys))
    np.testing.assert_array_equal(got, np.sort(np.asarray(keys), axis=1)[:, ::-1][:, k - 1])
