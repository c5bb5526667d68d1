"""GAE against a textbook per-episode python loop, on masked batches with random lengths and padding sides."""

import hypothesis
import hypothesis.strategies as st
import jax
import numpy as np

from jaxrlhf import losses

B, T = 4, 9
_gae = jax.jit(losses.gae)  # gamma and lam are traced: one compilation


def naive_gae(rewards, values, mask, gamma, lam):
    """Split each row into its runs of valid tokens; run the textbook recursion on every run (V after = 0)."""
    adv = np.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        t = 0
        while t < rewards.shape[1]:
            if not mask[b, t]:
                t += 1
                continue
            end = t
            while end < rewards.shape[1] and mask[b, end]:
                end += 1
            last = 0.0
            for i in reversed(range(t, end)):
                next_v = values[b, i + 1] if i + 1 < end else 0.0
                delta = rewards[b, i] + gamma * next_v - values[b, i]
                last = delta + gamma * lam * last
                adv[b, i] = last
            t = end
    return adv, (adv + values) * mask


@st.composite
def masked_batch(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    mask = np.zeros((B, T), np.float32)
    for b in range(B):
        length = draw(st.integers(0, T))
        start = draw(st.integers(0, T - length))  # left, right or both-sided padding
        mask[b, start : start + length] = 1.0
    if draw(st.booleans()):  # a hole: e.g. prompt tokens masked out between two segments
        mask[0, :] = 1.0
        mask[0, T // 2] = 0.0
    rewards = rng.normal(size=(B, T)).astype(np.float32)
    values = rng.normal(size=(B, T)).astype(np.float32)
    return rewards, values, mask


@hypothesis.given(masked_batch(), st.sampled_from([1.0, 0.99, 0.9]), st.sampled_from([1.0, 0.95, 0.5, 0.0]))
def test_matches_naive_loop(batch, gamma, lam):
    rewards, values, mask = batch
    adv, ret = _gae(rewards, values, mask, gamma=gamma, lam=lam)
    exp_adv, exp_ret = naive_gae(rewards.astype(np.float64), values.astype(np.float64), mask, gamma, lam)
    np.testing.assert_allclose(adv, exp_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, exp_ret, rtol=1e-5, atol=1e-5)


def test_padding_values_are_never_bootstrapped():
    """Garbage rewards/values at padding change nothing; lam = gamma = 1 gives Monte-Carlo returns."""
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=(B, T)).astype(np.float32)
    values = rng.normal(size=(B, T)).astype(np.float32)
    mask = np.zeros((B, T), np.float32)
    for b, n in enumerate([T, 5, 1, 3]):
        mask[b, :n] = 1.0
    adv, ret = _gae(rewards, values, mask, gamma=1.0, lam=1.0)
    noisy_r = np.where(mask > 0, rewards, 1e3)
    noisy_v = np.where(mask > 0, values, -1e3)
    adv2, ret2 = _gae(noisy_r, noisy_v, mask, gamma=1.0, lam=1.0)
    np.testing.assert_array_equal(adv, adv2)
    np.testing.assert_array_equal(ret, ret2)
    reward_to_go = np.cumsum((rewards * mask)[:, ::-1], axis=1)[:, ::-1] * mask
    np.testing.assert_allclose(ret, reward_to_go, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(adv, (reward_to_go - values) * mask, rtol=1e-5, atol=1e-5)


@st.composite
def aligned_batch(draw):
    """Contiguous valid runs only: right-padded (left-aligned), left-padded (right-aligned) or both."""
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    mask = np.zeros((B, T), np.float32)
    for b in range(B):
        length = draw(st.integers(0, T))
        side = draw(st.sampled_from(["left_aligned", "right_aligned", "inner"]))
        start = {"left_aligned": 0, "right_aligned": T - length}.get(side, draw(st.integers(0, T - length)))
        mask[b, start : start + length] = 1.0
    return rng.normal(size=(B, T)).astype(np.float32), rng.normal(size=(B, T)).astype(np.float32), mask


@hypothesis.given(aligned_batch())
def test_lam_one_gamma_one_is_reward_to_go_minus_values(batch):
    rewards, values, mask = batch
    adv, ret = _gae(rewards, values, mask, gamma=1.0, lam=1.0)
    reward_to_go = np.cumsum((rewards * mask)[:, ::-1], axis=1)[:, ::-1] * mask
    np.testing.assert_allclose(ret, reward_to_go, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(adv, (reward_to_go - values) * mask, rtol=1e-5, atol=1e-5)


@hypothesis.given(aligned_batch(), st.sampled_from([1.0, 0.9]))
def test_lam_zero_is_one_step_td(batch, gamma):
    rewards, values, mask = batch
    adv, ret = _gae(rewards, values, mask, gamma=gamma, lam=0.0)
    next_v = np.concatenate([(values * mask)[:, 1:], np.zeros((B, 1), np.float32)], axis=1)
    td = (rewards + gamma * next_v - values) * mask  # V after the last valid token is 0 (masked)
    np.testing.assert_allclose(adv, td, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, (rewards + gamma * next_v) * mask, rtol=1e-5, atol=1e-5)
