"""Exactness of the sampling transforms against distributions written in numpy from their definitions."""

import functools
import math

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf._sampling import SamplingConfig, sample, sampling_probs

LOGITS = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, 0.3, 1.2, -2.0], np.float32)
DRAWS = 40_000


def reference_probs(z, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, banned=()):
    """The sampling distribution by definition: softmax(z/T), then top-k, top-p, min-p cuts, renormalised."""
    z = np.asarray(z, np.float64).copy()
    z[list(banned)] = -np.inf
    p = np.exp((z - z.max()) / temperature)
    p /= p.sum()
    keep = p > 0
    order = np.argsort(-p, kind="stable")
    if top_k:
        keep[order[top_k:]] = False
    if top_p < 1.0:
        q = np.where(keep, p, 0.0)
        q /= q.sum()
        before = 0.0
        for i in order:
            if before >= top_p:
                keep[i] = False
            before += q[i]
    if min_p > 0.0:
        q = np.where(keep, p, 0.0)
        keep &= q >= min_p * q.max()
    out = np.where(keep, p, 0.0)
    return out / out.sum()


def chi_square_threshold(df: int, z: float = 4.0) -> float:
    """Upper quantile of chi-square(df) at a normal z-score (Wilson-Hilferty); z=4 ~ p=3e-5."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@functools.cache
def _sampler(cfg: SamplingConfig, stop_ids=(), allow_stop=True):
    return jax.jit(lambda z, rng: sample(z, rng, cfg, stop_ids=stop_ids, allow_stop=allow_stop))


def _draw(cfg, seed=0, stop_ids=(), allow_stop=True):
    z = jnp.broadcast_to(jnp.asarray(LOGITS), (DRAWS, LOGITS.size))
    tokens, logprobs, raw = _sampler(cfg, stop_ids, allow_stop)(z, jax.random.key(seed))
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
