"""PPO clipping at its boundaries, the value loss, and the masked reductions, against numpy definitions."""

import hypothesis
import hypothesis.strategies as st
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


# ------------------------------------------------------------------- dual clip, aggregation, entropy, rewards

B, T = 3, 5
arrays = st.integers(0, 2**31).map(np.random.default_rng)


def _draw(rng, scale=2.0):
    logp = rng.normal(size=(B, T)).astype(np.float32) * scale  # log ratios up to exp(+-6)
    old = np.zeros((B, T), np.float32)
    adv = rng.normal(size=(B, T)).astype(np.float32)
    mask = (rng.random((B, T)) < 0.7).astype(np.float32)
    return logp, old, adv, mask


_terms = jax.jit(
    lambda lp, old, adv, c: losses.ppo_policy_terms(lp, old, adv, clip_eps=EPS, dual_clip=c)[0],
    static_argnums=3,
)
_plain_terms = jax.jit(lambda lp, old, adv: losses.ppo_policy_terms(lp, old, adv, clip_eps=EPS)[0])


@hypothesis.given(arrays, st.sampled_from([1.5, 3.0]))
def test_dual_clip_caps_negative_advantages_and_leaves_positive_ones(rng, c):
    logp, old, adv, _ = _draw(rng)
    dual = np.asarray(_terms(logp, old, adv, c))
    plain = np.asarray(_plain_terms(logp, old, adv))
    neg = adv < 0
    assert np.all(dual[neg] <= -c * adv[neg] + 1e-6)  # never above -c A when A < 0
    np.testing.assert_array_equal(dual[~neg], plain[~neg])  # plain clip when A >= 0
    # the cap is active exactly where the ratio exceeds c (for A < 0 the plain loss is -A max(rho, 1-eps))
    ratio = np.exp(logp)
    np.testing.assert_allclose(dual[neg], np.where(ratio > c, -c * adv, plain)[neg], rtol=1e-5)


def test_dual_clip_gradient_vanishes_beyond_the_cap_and_rejects_c_below_one():
    g = jax.grad(
        lambda lp: losses.ppo_policy_loss(
            lp, jnp.zeros((1, 1)), -jnp.ones((1, 1)), jnp.ones((1, 1)), dual_clip=3.0
        )[0]
    )
    assert float(g(jnp.log(jnp.full((1, 1), 4.0)))[0, 0]) == 0.0  # rho = 4 > c = 3: capped, no gradient
    np.testing.assert_allclose(g(jnp.log(jnp.full((1, 1), 2.0)))[0, 0], 2.0, rtol=1e-6)  # -A rho, rho = 2
    with pytest.raises(ValueError, match="dual_clip"):
        losses.ppo_policy_loss(
            jnp.zeros((1, 1)), jnp.zeros((1, 1)), jnp.ones((1, 1)), jnp.ones((1, 1)), dual_clip=0.5
        )


@hypothesis.given(arrays)
def test_seq_mean_and_split_denominators_add_up(rng):
    logp, old, adv, mask = _draw(rng, scale=0.3)
    per = np.asarray(_plain_terms(logp, old, adv), np.float64)
    seq, _ = losses.ppo_policy_loss(logp, old, adv, mask, clip_eps=EPS, loss_agg="seq_mean")
    rows = [np.sum(p * m) / max(m.sum(), 1) for p, m in zip(per, mask, strict=True)]
    np.testing.assert_allclose(seq, np.mean(rows), rtol=1e-5, atol=1e-6)
    tok, _ = losses.ppo_policy_loss(logp, old, adv, mask, clip_eps=EPS)
    np.testing.assert_allclose(tok, np.sum(per * mask) / max(mask.sum(), 1), rtol=1e-5, atol=1e-6)
    # micro-batches (rows [0], [1, 2]) with the whole batch's denominator sum to the whole-batch loss
    for agg, denom in [("token_mean", mask.sum()), ("seq_mean", B)]:
        parts = [
            losses.aggregate_loss(per[s], mask[s], loss_agg=agg, denominator=denom)
            for s in (slice(0, 1), slice(1, 3))
        ]
        whole = losses.aggregate_loss(per, mask, loss_agg=agg)
        np.testing.assert_allclose(sum(parts), whole, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="loss_agg"):
        losses.aggregate_loss(per, mask, loss_agg="sum")


@hypothesis.given(st.integers(2, 50), st.floats(0.3, 3.0), st.floats(-5.0, 5.0))
def test_entropy_uniform_is_log_v_and_one_hot_is_zero(vocab, temperature, level):
    uniform = jnp.full((2, vocab), level)
    np.testing.assert_allclose(
        losses.token_entropy(uniform, temperature=temperature), np.log(vocab), rtol=1e-5
    )
    one_hot = jnp.where(jnp.arange(vocab) == 1, 1e4, 0.0)[None]
    np.testing.assert_allclose(losses.token_entropy(one_hot, temperature=temperature), 0.0, atol=1e-5)


def test_entropy_matches_numpy_with_temperature():
    z = np.random.default_rng(3).normal(size=(4, 7, 11)).astype(np.float32) * 3
    for tau in (1.0, 0.7):
        p = np.exp(z / tau - np.log(np.sum(np.exp(z / tau), -1, keepdims=True)))
        np.testing.assert_allclose(
            jax.jit(lambda x, t=tau: losses.token_entropy(x, temperature=t))(z),
            -np.sum(p * np.log(p), -1),
            rtol=1e-4,
        )


@hypothesis.given(arrays, st.floats(0.0, 0.5))
def test_token_rewards_put_the_score_on_the_last_valid_token(rng, beta):
    mask = np.zeros((B, T), np.float32)
    mask[0, 1:4] = 1  # inner segment
    mask[1, :] = 1
    mask[2, T - 2 :] = 1  # left padding
    kl = rng.normal(size=(B, T)).astype(np.float32)
    scores = rng.normal(size=(B,)).astype(np.float32)
    r = np.asarray(losses.token_rewards(scores, kl, mask, kl_coef=beta))
    expected = -beta * kl * mask
    expected[[0, 1, 2], [3, T - 1, T - 1]] += scores
    np.testing.assert_allclose(r, expected, rtol=1e-6, atol=1e-6)
    empty = losses.token_rewards(scores[:1], kl[:1], np.zeros((1, T)), kl_coef=beta)
    assert np.all(np.asarray(empty) == 0.0)  # no valid token: the score is dropped, padding stays 0
