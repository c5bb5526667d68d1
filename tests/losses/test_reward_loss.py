"""Bradley-Terry reward loss properties and the running reward normaliser against numpy."""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf import losses

floats = st.floats(-8.0, 8.0, allow_nan=False, width=32)
N = 6  # fixed batch size: one compilation per jitted function
pairs = st.lists(st.tuples(floats, floats), min_size=N, max_size=N)

_loss = jax.jit(lambda c, r: losses.reward_loss(c, r)[0])
_loss_margin = jax.jit(lambda c, r, mu: losses.reward_loss(c, r, margin=mu)[0])
_grads = jax.jit(jax.grad(lambda c, r: losses.reward_loss(c, r)[0], argnums=(0, 1)))


def _np_log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


@hypothesis.given(pairs)
def test_swapping_chosen_and_rejected_mirrors_the_loss(p):
    a = np.array([x for x, _ in p], np.float32)
    b = np.array([y for _, y in p], np.float32)
    d = a.astype(np.float64) - b
    forward = _loss(a, b)
    backward = _loss(b, a)
    np.testing.assert_allclose(forward, np.mean(-_np_log_sigmoid(d)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(backward, np.mean(-_np_log_sigmoid(-d)), rtol=1e-5, atol=1e-6)
    # -log sig(d) + log sig(-d) = -d
    np.testing.assert_allclose(forward - backward, -np.mean(d), rtol=1e-4, atol=1e-4)


@hypothesis.given(pairs)
def test_gradients_push_the_margin_the_right_way(p):
    a = jnp.array([x for x, _ in p], jnp.float32)
    b = jnp.array([y for _, y in p], jnp.float32)
    g_c, g_r = _grads(a, b)
    assert np.all(np.asarray(g_c) < 0) and np.all(np.asarray(g_r) > 0)
    np.testing.assert_allclose(g_c, -g_r)
    # d loss / d r_c = -sigmoid(-(r_c - r_r)) / B
    np.testing.assert_allclose(g_c, -1 / (1 + np.exp(np.asarray(a - b, np.float64))) / N, rtol=1e-4)


@hypothesis.given(st.lists(floats, min_size=N, max_size=N), st.floats(-3.0, 3.0, width=32))
def test_margin_shifts_the_decision_boundary(rejected, margin):
    r = np.array(rejected, np.float32)
    mu = np.full_like(r, margin)
    at_boundary = _loss_margin(r + mu, r, mu)
    np.testing.assert_allclose(at_boundary, np.log(2.0), rtol=1e-5)
    above = _loss_margin(r + mu + 1.0, r, mu)
    assert float(above) < np.log(2.0)


def test_center_coefficient_and_metrics_match_trl_definitions():
    rng = np.random.default_rng(1)
    rc, rr, mu = (rng.normal(size=9).astype(np.float32) for _ in range(3))
    loss, m = jax.jit(lambda *a: losses.reward_loss(a[0], a[1], margin=a[2], center_coef=0.01))(rc, rr, mu)
    d = rc.astype(np.float64) - rr
    # TRL RewardTrainer: -logsigmoid(r_c - r_r - margin).mean() + coef * mean((r_c + r_r)^2)
    expected = np.mean(-_np_log_sigmoid(d - mu)) + 0.01 * np.mean((rc.astype(np.float64) + rr) ** 2)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    both = np.concatenate([rc, rr]).astype(np.float64)
    np.testing.assert_allclose(m["accuracy"], np.mean(d > 0))
    np.testing.assert_allclose(m["margin"], d.mean(), rtol=1e-5)
    np.testing.assert_allclose(m["reward_mean"], both.mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m["reward_std"], both.std(), rtol=1e-5)


def test_mask_drops_padding_pairs():
    rc = np.array([1.0, -2.0, 5.0], np.float32)
    rr = np.array([0.0, 3.0, -9.0], np.float32)
    full, _ = losses.reward_loss(rc[:2], rr[:2])
    masked, m = losses.reward_loss(rc, rr, mask=np.array([1, 1, 0]))
    np.testing.assert_allclose(masked, full, rtol=1e-6)
    np.testing.assert_allclose(m["accuracy"], 0.5)


_norm = losses.running_reward_normalizer()
_norm_update = jax.jit(_norm.update)


@hypothesis.given(st.lists(st.lists(floats, min_size=N, max_size=N), min_size=1, max_size=5), st.randoms())
def test_running_normalizer_matches_numpy_over_the_stream(batches, rnd):
    state = _norm.init()
    seen = []
    for b in batches:
        r = np.array(b, np.float32)
        mask = np.array([rnd.random() < 0.8 for _ in b], np.float32)
        state = _norm_update(state, r, mask)
        seen.extend(r[mask > 0].tolist())
    seen = np.array(seen, np.float64)
    np.testing.assert_allclose(state.count, len(seen))
    if len(seen):
        np.testing.assert_allclose(state.mean, seen.mean(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(state.var, seen.var(), rtol=1e-4, atol=1e-4)
        z = losses.normalize_rewards(state, seen.astype(np.float32), eps=0.0)
        if seen.std() > 1e-2:
            np.testing.assert_allclose(z, (seen - seen.mean()) / seen.std(), rtol=1e-3, atol=1e-3)


@hypothesis.given(
    st.floats(-3.0, 3.0),
    st.floats(0.1, 3.0),
    st.sampled_from([1.0, 16.0, 1000.0]),
    st.lists(floats, min_size=N, max_size=N),
)
def test_seeded_stats_merge_like_pseudo_samples(mean, std, count, batch):
    """Seeded (mean, std, count) then a batch == the pooled moments of `count` seed samples and the batch."""
    state = _norm_update(losses.seeded_reward_stats(mean, std, count=count), np.array(batch, np.float32))
    r = np.array(batch, np.float64)
    n = count + N
    pooled_mean = (count * mean + r.sum()) / n
    pooled_var = (count * (std**2 + (mean - pooled_mean) ** 2) + np.sum((r - pooled_mean) ** 2)) / n
    np.testing.assert_allclose(state.count, n)
    np.testing.assert_allclose(state.mean, pooled_mean, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(state.var, pooled_var, rtol=1e-3, atol=1e-4)
    seed = losses.seeded_reward_stats(mean, std, count=count)
    np.testing.assert_allclose(seed.std, std, rtol=1e-5)
    # the seed alone normalises with the reward model's statistics
    np.testing.assert_allclose(
        losses.normalize_rewards(seed, jnp.float32(mean + std), eps=0.0), 1.0, rtol=1e-4
    )


@hypothesis.given(st.lists(floats, min_size=N, max_size=N), st.floats(0.1, 5.0))
def test_reward_clipping_bounds_and_keeps_inner_values(values, clip):
    r = np.array(values, np.float32)
    c = np.asarray(losses.clip_rewards(r, clip=clip))
    assert np.all(np.abs(c) <= np.float32(clip))
    inside = np.abs(r) <= clip
    np.testing.assert_array_equal(c[inside], r[inside])
    np.testing.assert_array_equal(losses.clip_rewards(r, clip=None), r)
