"""GRPO advantages and loss against TRL GRPOTrainer's formulas written in numpy."""

import jax
import numpy as np
import pytest

from jaxrlhf import losses

G, PROMPTS, T = 4, 3, 6


@pytest.fixture(scope="module")
def rollout():
    rng = np.random.default_rng(0)
    n = G * PROMPTS
    old = rng.normal(-2, 0.5, size=(n, T)).astype(np.float32)
    logp = (old + rng.normal(0, 0.3, size=(n, T))).astype(np.float32)
    ref = (old + rng.normal(0, 0.3, size=(n, T))).astype(np.float32)
    mask = np.zeros((n, T), np.float32)
    for i, length in enumerate(rng.integers(1, T + 1, size=n)):
        mask[i, :length] = 1.0
    rewards = rng.normal(size=n).astype(np.float32)
    return logp, old, ref, mask, rewards


def test_advantages_are_group_normalised_like_torch_std(rollout):
    rewards = rollout[-1]
    adv = jax.jit(losses.grpo_advantages, static_argnums=1)(rewards, G)
    r = rewards.astype(np.float64).reshape(-1, G)
    expected = (r - r.mean(1, keepdims=True)) / (r.std(1, ddof=1, keepdims=True) + 1e-4)
    np.testing.assert_allclose(adv, expected.reshape(-1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        losses.grpo_advantages(rewards, G, scale=False), (r - r.mean(1, keepdims=True)).reshape(-1), atol=1e-6
    )
    with pytest.raises(ValueError, match="group_size"):
        losses.grpo_advantages(rewards[:-1], G)


@pytest.mark.parametrize("loss_agg", losses.GRPO_LOSS_AGGREGATIONS)
def test_loss_matches_trl(rollout, loss_agg):
    logp, old, ref, mask, rewards = rollout
    adv = np.asarray(losses.grpo_advantages(rewards, G))
    beta, eps = 0.04, 0.2
    loss, m = losses.grpo_loss(logp, old, ref, adv, mask, clip_eps=eps, beta=beta, loss_agg=loss_agg)
    lp, o, rf = (x.astype(np.float64) for x in (logp, old, ref))
    ratio = np.exp(lp - o)
    per = -np.minimum(ratio * adv[:, None], np.clip(ratio, 1 - eps, 1 + eps) * adv[:, None])
    kl = np.exp(rf - lp) - (rf - lp) - 1  # TRL per_token_kl
    per = (per + beta * kl) * mask
    expected = {
        "seq_mean": np.mean(per.sum(1) / mask.sum(1)),
        "token_mean": per.sum() / mask.sum(),
        "dr_grpo": per.sum() / per.size,
    }[loss_agg]
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(m["kl"], np.sum(kl * mask) / mask.sum(), rtol=1e-4)


def test_zero_beta_needs_no_reference(rollout):
    logp, old, _, mask, rewards = rollout
    adv = losses.grpo_advantages(rewards, G)
    loss, m = losses.grpo_loss(logp, old, None, adv, mask, beta=0.0)
    assert np.isfinite(float(loss)) and float(m["kl"]) == 0.0
    with pytest.raises(ValueError, match="ref_logprobs"):
        losses.grpo_loss(logp, old, None, adv, mask, beta=0.1)
