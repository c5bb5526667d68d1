"""Properties of the GRPO / RLOO advantages and losses (TRL parity itself: tests/stages/test_grpo_trl.py).

- advantages: GRPO's are group-normalised like torch.std (Bessel), sum to zero per group, ignore a constant
  shift per group (and a positive scale under scale="group"); RLOO's are G / (G - 1) (r - group mean) with
  every row valid; an unscorable row gets 0 and the others are what its group without it would give;
- loss: at rho = 1 every loss type is -A on average (sapo: -2 A / tau) and its gradient is the policy
  gradient; the
  micro-batch shares of grpo / dr_grpo / dapo / luspo / rloo add up to the one-batch loss; clipped tokens
  carry no gradient; the k3 term (without the bias correction) is TRL's formula.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxrlhf import losses

G, PROMPTS, T = 4, 3, 6


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    n = G * PROMPTS
    old = rng.normal(-2, 0.5, size=(n, T)).astype(np.float32)
    logp = (old + rng.normal(0, 0.3, size=(n, T))).astype(np.float32)
    ref = (old + rng.normal(0, 0.3, size=(n, T))).astype(np.float32)
    mask = np.zeros((n, T), np.float32)
    for i, length in enumerate(rng.integers(1, T + 1, size=n)):
        mask[i, :length] = 1.0
    rewards = rng.normal(size=n).astype(np.float32)
    return logp * mask, old * mask, ref * mask, mask, rewards


def test_advantages_are_group_normalised_like_torch_std(batch):
    rewards = batch[-1]
    adv = jax.jit(losses.grpo_advantages, static_argnums=1)(rewards, G)
    r = rewards.astype(np.float64).reshape(-1, G)
    expected = (r - r.mean(1, keepdims=True)) / (r.std(1, ddof=1, keepdims=True) + 1e-4)
    np.testing.assert_allclose(adv, expected.reshape(-1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        losses.grpo_advantages(rewards, G, scale=False), (r - r.mean(1, keepdims=True)).reshape(-1), atol=1e-6
    )
    batch_std = (r - r.mean(1, keepdims=True)) / (r.std(ddof=1) + 1e-4)
    np.testing.assert_allclose(
        losses.grpo_advantages(rewards, G, scale="batch"), batch_std.reshape(-1), atol=1e-5
    )
    with pytest.raises(ValueError, match="group_size"):
        losses.grpo_advantages(rewards[:-1], G)


rewards_st = st.lists(st.floats(-5, 5, width=32), min_size=G * 2, max_size=G * 2).map(
    lambda x: np.asarray(x, np.float32)
)


@settings(max_examples=25, deadline=None)
@given(rewards_st, st.floats(-3, 3), st.floats(0.5, 4))
def test_group_invariances(rewards, shift, scale):
    a = losses.grpo_advantages(rewards, G, scale="none")
    chex.assert_trees_all_close(jnp.sum(a.reshape(-1, G), axis=1), jnp.zeros(2), atol=1e-4)
    chex.assert_trees_all_close(losses.grpo_advantages(rewards + shift, G, scale="none"), a, atol=1e-4)
    std = np.asarray(rewards, np.float64).reshape(-1, G).std(1, ddof=1)
    if np.all(std > 0.05):  # away from the eps of the denominator
        chex.assert_trees_all_close(
            losses.grpo_advantages(rewards * scale, G),
            losses.grpo_advantages(rewards, G),
            atol=2e-3,
            rtol=2e-3,
        )
    r = rewards.reshape(-1, G)
    loo = G / (G - 1) * (r - r.mean(1, keepdims=True))
    chex.assert_trees_all_close(losses.rloo_advantages(rewards, G), loo.reshape(-1), atol=1e-4, rtol=1e-4)


@settings(max_examples=15, deadline=None)
@given(rewards_st, st.integers(0, G * 2 - 1))
def test_an_unscorable_row_is_left_out(rewards, drop):
    valid = np.ones(G * 2, bool)
    valid[drop] = False
    g, i = divmod(drop, G)
    keep = [j for j in range(G) if j != i]
    for fn, kw in ((losses.grpo_advantages, {"scale": "none"}), (losses.rloo_advantages, {})):
        a = np.asarray(fn(rewards, G, valid=valid, **kw))
        assert a[drop] == 0.0
        sub = rewards.reshape(-1, G)[g, keep]
        sub_mean = sub.mean()
        expected = sub - sub_mean if fn is losses.grpo_advantages else (G - 1) / (G - 2) * (sub - sub_mean)
        np.testing.assert_allclose(a.reshape(-1, G)[g, keep], expected, atol=1e-4)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "luspo", "rloo", "sapo"])
def test_on_policy_value_and_gradient(batch, loss_type):
    _, old, _, mask, rewards = batch
    adv = losses.grpo_advantages(rewards, G)

    def loss(lp):
        return losses.grpo_loss(lp, old, None, adv, mask, beta=0.0, loss_agg=loss_type)[0]

    def surrogate(lp):  # the policy-gradient surrogate -A log pi, aggregated the same way
        per = -(adv[:, None] * (lp - jax.lax.stop_gradient(lp)))
        if loss_type == "rloo":
            per = jnp.sum(per * mask, axis=1, keepdims=True)
        return losses.grpo_aggregate(per, mask, loss_type=loss_type)

    coef = jnp.where(adv > 0, 2.0 / 1.0, 2.0 / 1.05) if loss_type == "sapo" else 1.0  # sigmoid(0) 4 / tau
    value = losses.grpo_aggregate(
        -jnp.broadcast_to((coef * adv)[:, None], mask.shape), mask, loss_type=loss_type
    )
    if loss_type == "rloo":
        value = -jnp.mean(adv)
    np.testing.assert_allclose(loss(jnp.asarray(old)), value, atol=1e-5)
    chex.assert_trees_all_close(
        jax.grad(loss)(jnp.asarray(old)), jax.grad(surrogate)(jnp.asarray(old)), atol=1e-6
    )


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "luspo", "rloo"])
def test_micro_batch_shares_add_up(batch, loss_type):
    logp, old, _, mask, rewards = batch
    adv = np.asarray(losses.grpo_advantages(rewards, G))
    terms = dict(loss_type=loss_type)
    whole = losses.grpo_aggregate(
        losses.grpo_token_terms(logp, old, adv, mask, **terms)[0], mask, loss_type=loss_type,
        max_completion_length=T, token_normalizer=mask.sum(),
    )  # fmt: skip
    k, parts = 3, 0.0
    for idx in np.split(np.arange(len(adv)), k):
        per, _ = losses.grpo_token_terms(logp[idx], old[idx], adv[idx], mask[idx], **terms)
        parts += losses.grpo_aggregate(
            per, mask[idx], loss_type=loss_type, micro_batches=k, max_completion_length=T,
            token_normalizer=mask.sum(),
        )  # fmt: skip
    np.testing.assert_allclose(parts, whole, rtol=1e-5)


def test_clipped_tokens_carry_no_gradient(batch):
    logp, old, _, mask, rewards = batch
    adv = losses.grpo_advantages(rewards, G)
    per_fn = lambda lp: losses.grpo_token_terms(lp, old, adv, mask, loss_type="bnpo", clip_eps=0.1)  # noqa: E731
    grad = jax.grad(lambda lp: jnp.sum(per_fn(lp)[0] * mask))(jnp.asarray(logp))
    _, t = per_fn(jnp.asarray(logp))
    clipped = (np.asarray(t["low_clipped"]) + np.asarray(t["high_clipped"])) * mask > 0
    assert clipped.sum() > 3 and np.all(np.asarray(grad)[clipped] == 0.0)
    assert np.all(np.asarray(grad)[~clipped & (mask > 0)] != 0.0)


def test_k3_term_is_trls_formula(batch):
    logp, old, ref, mask, rewards = batch
    adv = np.asarray(losses.grpo_advantages(rewards, G))
    beta = 0.04
    with_kl, m = losses.grpo_loss(logp, old, ref, adv, mask, beta=beta, use_bias_correction_kl=False)
    without, _ = losses.grpo_loss(logp, old, None, adv, mask, beta=0.0)
    d = ref.astype(np.float64) - logp
    kl = (np.exp(d) - d - 1) * mask  # TRL's per_token_kl
    np.testing.assert_allclose(with_kl - without, beta * np.mean(kl.sum(1) / mask.sum(1)), rtol=1e-4)
    np.testing.assert_allclose(m["kl"], kl.sum() / mask.sum(), rtol=1e-4)
    corrected, _ = losses.grpo_loss(logp, old, ref, adv, mask, beta=beta)  # times the ratio (TRL default)
    rho = np.exp(logp.astype(np.float64) - old)
    np.testing.assert_allclose(
        corrected - without, beta * np.mean((kl * rho).sum(1) / mask.sum(1)), rtol=1e-4
    )
    with pytest.raises(ValueError, match="ref_logprobs"):
        losses.grpo_loss(logp, old, None, adv, mask, beta=0.1)
