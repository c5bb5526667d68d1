"""KL estimators against the exact KL of small categorical distributions; the KL coefficient controllers."""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf import losses

DRAWS = 200_000


@pytest.fixture(scope="module")
def samples():
    """Tokens drawn from the policy p; exact log p and log q of each draw."""
    p = np.array([0.5, 0.2, 0.15, 0.1, 0.05])
    q = np.array([0.2, 0.3, 0.2, 0.2, 0.1])
    x = jax.random.categorical(jax.random.key(0), jnp.log(jnp.asarray(p, jnp.float32)), shape=(DRAWS,))
    x = np.asarray(x)
    return p, q, np.log(p)[x].astype(np.float32), np.log(q)[x].astype(np.float32)


def _exact(p, q, f):
    """Exact mean and std of the per-sample estimator f(log r) with log r = log p - log q, under x ~ p."""
    vals = f(np.log(p) - np.log(q))
    mean = np.sum(p * vals)
    return mean, np.sqrt(np.sum(p * (vals - mean) ** 2))


EXACT_FORMS = {
    "k1": lambda lr: lr,
    "k2": lambda lr: 0.5 * lr**2,
    "k3": lambda lr: np.exp(-lr) - 1 + lr,
    "abs": lambda lr: np.abs(lr),
}


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "abs", "mse"])
def test_monte_carlo_mean_matches_its_exact_expectation(samples, estimator):
    p, q, logp, logq = samples
    est = np.asarray(losses.kl_penalty(logp, logq, estimator=estimator), np.float64)
    mean, std = _exact(p, q, EXACT_FORMS["k2" if estimator == "mse" else estimator])
    # CLT: the sample mean is within 5 standard errors of the expectation
    assert abs(est.mean() - mean) < 5 * std / np.sqrt(DRAWS)


def test_k1_and_k3_are_unbiased_k2_and_abs_are_biased(samples):
    p, q, logp, logq = samples
    kl = float(np.sum(p * np.log(p / q)))
    for estimator, unbiased in [("k1", True), ("k3", True), ("k2", False), ("abs", False)]:
        mean, std = _exact(p, q, EXACT_FORMS[estimator])
        if unbiased:
            np.testing.assert_allclose(mean, kl, rtol=1e-12)
        else:
            assert abs(mean - kl) > 20 * std / np.sqrt(DRAWS), estimator  # a bias the test can see
        est = np.asarray(losses.kl_penalty(logp, logq, estimator=estimator), np.float64)
        assert (abs(est.mean() - kl) < 5 * std / np.sqrt(DRAWS)) == unbiased, estimator
    # k3 has lower variance than k1 here, and k2, k3, abs are nonnegative per sample
    assert _exact(p, q, EXACT_FORMS["k3"])[1] < _exact(p, q, EXACT_FORMS["k1"])[1]
    for estimator in ("k2", "k3", "abs"):
        assert np.all(np.asarray(losses.kl_penalty(logp, logq, estimator=estimator)) >= 0)


def test_unknown_estimator_is_rejected():
    with pytest.raises(ValueError, match="estimator"):
        losses.kl_penalty(jnp.zeros(2), jnp.zeros(2), estimator="k4")


def test_adaptive_controller_follows_ziegler_et_al():
    ctl = losses.adaptive_kl_controller(0.2, target=6.0, horizon=10_000)
    update = jax.jit(ctl.update)
    state = ctl.init()
    coef = 0.2
    for kl, n in [(12.0, 256), (6.3, 256), (1.0, 512), (6.0, 64), (5.0, 1000)]:
        state = update(state, kl, n)
        coef *= 1 + np.clip(kl / 6.0 - 1, -0.2, 0.2) * n / 10_000  # TRL AdaptiveKLController.update
        np.testing.assert_allclose(state.kl_coef, coef, rtol=1e-6)
    high = update(ctl.init(), 100.0, 10_000)
    np.testing.assert_allclose(high.kl_coef, 0.2 * 1.2, rtol=1e-6)  # error clipped at +20%
    fixed = losses.fixed_kl_controller(0.05)
    assert float(fixed.update(fixed.init(), 100.0, 10).kl_coef) == pytest.approx(0.05)


_adaptive = losses.adaptive_kl_controller(0.1, target=6.0, horizon=10_000)
_adaptive_update = jax.jit(_adaptive.update)
kl_values = st.floats(0.0, 60.0, allow_nan=False, width=32)


@hypothesis.given(st.floats(1e-3, 2.0), kl_values, st.integers(1, 20_000))
def test_adaptive_coefficient_moves_towards_the_target_with_a_clipped_error(coef, kl, n):
    state = _adaptive_update(losses.KLControllerState(jnp.float32(coef)), kl, n)
    ratio = float(state.kl_coef) / np.float32(coef)
    if kl > 6.0 * (1 + 1e-6):
        assert ratio > 1.0  # KL above target: penalise more
    elif kl < 6.0 * (1 - 1e-6):
        assert ratio < 1.0  # below: penalise less
    # |e| <= 0.2: the coefficient moves by at most 20% * n / horizon
    assert 1 - 0.2 * n / 10_000 - 1e-5 <= ratio <= 1 + 0.2 * n / 10_000 + 1e-5
    np.testing.assert_allclose(ratio, 1 + np.clip(kl / 6.0 - 1, -0.2, 0.2) * n / 10_000, rtol=1e-5)


@hypothesis.given(st.lists(st.tuples(kl_values, st.integers(1, 5000)), min_size=1, max_size=5))
def test_fixed_controller_stays_fixed(history):
    ctl = losses.fixed_kl_controller(0.05)
    state = ctl.init()
    for kl, n in history:
        state = ctl.update(state, kl, n)
    assert float(state.kl_coef) == np.float32(0.05)


def test_controller_rejects_bad_settings():
    for kw in ({"target": 0.0, "horizon": 10.0}, {"target": 1.0, "horizon": -1.0}):
        with pytest.raises(ValueError, match="target"):
            losses.adaptive_kl_controller(0.1, **kw)
