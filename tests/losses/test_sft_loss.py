"""sft_loss and token_logprobs against optax's cross entropy and numpy definitions."""

import jax
import numpy as np
import optax
import pytest

from jaxrlhf import losses

B, T, V = 3, 7, 11


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(B, T, V)).astype(np.float32) * 3
    targets = rng.integers(0, V, size=(B, T))
    mask = (rng.random((B, T)) < 0.7).astype(np.float32)
    mask[0, :] = 0.0  # a row without any loss tokens
    mask[1, 0] = 1.0
    return logits, targets, mask


def _np_lse(z):
    m = z.max(-1, keepdims=True)
    return (m + np.log(np.exp(z - m).sum(-1, keepdims=True)))[..., 0]


def test_matches_optax_cross_entropy(batch):
    logits, targets, mask = batch
    loss, metrics = jax.jit(losses.sft_loss)(logits, targets, mask)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    expected = np.sum(np.asarray(ce) * mask) / mask.sum()
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(metrics["nll"], expected, rtol=1e-5)
    np.testing.assert_allclose(metrics["token_count"], mask.sum())
    acc = np.sum((logits.argmax(-1) == targets) * mask) / mask.sum()
    np.testing.assert_allclose(metrics["accuracy"], acc, rtol=1e-6)


def test_label_smoothing_matches_optax(batch):
    logits, targets, mask = batch
    alpha = 0.1
    loss, _ = losses.sft_loss(logits, targets, mask, label_smoothing=alpha)
    labels = optax.smooth_labels(jax.nn.one_hot(targets, V), alpha)
    ce = optax.softmax_cross_entropy(logits, labels)
    np.testing.assert_allclose(loss, np.sum(np.asarray(ce) * mask) / mask.sum(), rtol=1e-5)


def test_z_loss_adds_squared_log_partition(batch):
    logits, targets, mask = batch
    coef = 1e-3
    base, _ = losses.sft_loss(logits, targets, mask)
    with_z, metrics = losses.sft_loss(logits, targets, mask, z_loss=coef)
    lse2 = np.sum(_np_lse(logits.astype(np.float64)) ** 2 * mask) / mask.sum()
    np.testing.assert_allclose(metrics["z_loss"], lse2, rtol=1e-5)
    np.testing.assert_allclose(with_z - base, coef * lse2, rtol=1e-4)


def test_sum_and_count_make_accumulation_exact(batch):
    """Splitting a batch into micro-batches and normalising by the total count gives the full-batch loss."""
    logits, targets, mask = batch
    full, _ = losses.sft_loss(logits, targets, mask)
    parts = [losses.sft_loss(logits[i : i + 1], targets[i : i + 1], mask[i : i + 1])[1] for i in range(B)]
    total = sum(p["loss_sum"] for p in parts) / sum(p["token_count"] for p in parts)
    np.testing.assert_allclose(total, full, rtol=1e-6)
    # the naive mean of micro-batch means is not the same (rows have different token counts)
    naive = np.mean([p["loss_sum"] / max(float(p["token_count"]), 1.0) for p in parts])
    assert abs(naive - float(full)) > 1e-3


def test_empty_mask_is_zero_not_nan(batch):
    logits, targets, _ = batch
    loss, metrics = losses.sft_loss(logits, targets, np.zeros((B, T), np.float32))
    assert float(loss) == 0.0 and float(metrics["token_count"]) == 0.0


def test_shape_mismatch_is_reported(batch):
    logits, targets, mask = batch
    with pytest.raises(ValueError, match="disagree"):
        losses.sft_loss(logits, targets[:, :-1], mask)


def test_token_logprobs_matches_numpy_log_softmax(batch):
    logits, targets, _ = batch
    z = logits.astype(np.float64)
    ref = np.take_along_axis(z - _np_lse(z)[..., None], targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(jax.jit(losses.token_logprobs)(logits, targets), ref, rtol=1e-5, atol=1e-6)
    ref_t = np.take_along_axis(z / 0.7 - _np_lse(z / 0.7)[..., None], targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(losses.token_logprobs(logits, targets, temperature=0.7), ref_t, rtol=1e-5)
