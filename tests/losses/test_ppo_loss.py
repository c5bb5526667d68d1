"""PPO clipping at its boundaries, the value loss, and the masked reductions, against numpy definitions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf import losses

EPS = 0.2


def _policy(logp, old, adv, mask):
    return losses.ppo_policy_loss(logp, old, adv, mask, clip_eps=EPS)[0]


_policy_value_and_grad = jax.jit(jax.value_and_grad(_policy))


@pytest.mark.parametrize(
    "ratio, adv, clipped",
    [
        (1.5, 1.0, True),  # A > 0, ratio above 1 + eps: no more incentive, zero gradient
        (0.5, 1.0, False),  # A > 0, ratio below 1 - eps: pessimistic unclipped branch, gradient flows
        (0.5, -1.0, True),  # A < 0, ratio below 1 - eps: clipped, zero gradient
        (1.5, -1.0, False),  # A < 0, ratio above 1 + eps: unclipped
        (1.1, 1.0, False),  # inside the trust region
        (0.9, -1.0, False),
    ],
)
def test_clip_boundaries(ratio, adv, clipped):
    old = jnp.array([[-1.0, -2.0]])
    logp = old + jnp.log(jnp.array([[ratio, 1.0]]))
    mask = jnp.array([[1.0, 0.0]])
    loss, grad = _policy_value_and_grad(logp, old, jnp.array([[adv, 5.0]]), mask)
    eff = np.clip(ratio, 1 - EPS, 1 + EPS) if clipped else ratio
    np.testing.assert_allclose(loss, -adv * eff, rtol=1e-6)
    # d(-A rho)/d log pi = -A rho; the padding token gets no gradient
    np.testing.assert_allclose(grad[0, 0], 0.0 if clipped else -adv * ratio, rtol=1e-5, atol=1e-7)
    assert float(grad[0, 1]) == 0.0
    _, m = losses.ppo_policy_loss(logp, old, jnp.array([[adv, 5.0]]), mask, clip_eps=EPS)
    assert float(m["clipfrac"]) == float(clipped)


def test_clip_eps_high_widens_only_the_upper_side():
    old = jnp.zeros((1, 2))
    logp = jnp.log(jnp.array([[1.25, 0.7]]))
    adv = jnp.array([[1.0, -1.0]])
    loss, _ = losses.ppo_policy_loss(logp, old, adv, jnp.ones((1, 2)), clip_eps=0.2, clip_eps_high=0.28)
    np.testing.assert_allclose(loss, (-1.25 + 0.8) / 2, rtol=1e-6)  # 1.25 < 1.28 unclipped; 0.7 -> 0.8


def test_value_loss_matches_numpy_and_clips():
    rng = np.random.default_rng(0)
    v, old, ret = (rng.normal(size=(3, 5)).astype(np.float32) for _ in range(3))
    mask = (rng.random((3, 5)) < 0.7).astype(np.float32)
    loss, m = jax.jit(lambda *a: losses.ppo_value_loss(*a, clip_eps=EPS))(v, old, ret, mask)
    vc = old + np.clip(v - old, -EPS, EPS)
    per = np.maximum((v - ret) ** 2, (vc - ret) ** 2)
    np.testing.assert_allclose(loss, 0.5 * np.sum(per * mask) / mask.sum(), rtol=1e-5)
    np.testing.assert_allclose(
        m["vf_clipfrac"], np.sum(((vc - ret) ** 2 > (v - ret) ** 2) * mask) / mask.sum()
    )
    # old value 0, return 1: moving beyond the clip range towards the return earns no gradient (the clipped
    # error is larger), moving away from it keeps the full gradient (V - R), inside the range too
    g = jax.grad(lambda x: losses.ppo_value_loss(x, jnp.zeros((1, 1)), jnp.ones((1, 1)), jnp.ones((1, 1)))[0])
    assert float(g(jnp.full((1, 1), 0.5))[0, 0]) == 0.0
    np.testing.assert_allclose(g(jnp.full((1, 1), -0.5))[0, 0], -0.5 - 1.0, rtol=1e-6)
    np.testing.assert_allclose(g(jnp.full((1, 1), 0.1))[0, 0], 0.1 - 1.0, rtol=1e-6)


def test_masked_reductions():
    rng = np.random.default_rng(1)
    x = rng.normal(3.0, 2.0, size=(4, 6)).astype(np.float32)
    mask = (rng.random((4, 6)) < 0.6).astype(np.float32)
    vals = x[mask > 0].astype(np.float64)
    np.testing.assert_allclose(losses.masked_mean(x, mask), vals.mean(), rtol=1e-5)
    np.testing.assert_allclose(losses.masked_var(x, mask), vals.var(ddof=1), rtol=1e-4)
    np.testing.assert_allclose(
        losses.masked_mean(x, mask, axis=1), [np.mean(r[m > 0]) for r, m in zip(x, mask, strict=True)]
    )
    w = np.asarray(losses.masked_whiten(x, mask))
    np.testing.assert_allclose(w[mask > 0].mean(), 0.0, atol=1e-5)
    np.testing.assert_allclose(w[mask > 0].std(ddof=1), 1.0, rtol=1e-4)
    assert np.all(w[mask == 0] == 0.0)
    keep = np.asarray(losses.masked_whiten(x, mask, shift_mean=False))
    np.testing.assert_allclose(keep[mask > 0].mean(), vals.mean(), rtol=1e-4)
