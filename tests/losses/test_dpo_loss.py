"""dpo_loss against TRL's DPOTrainer.dpo_loss formulas written independently in numpy, and closed forms."""

import hypothesis
import hypothesis.strategies as st
import jax
import numpy as np
import pytest

from jaxrlhf import losses

N = 5


def _logsig(x):
    return -np.logaddexp(0.0, -x)


def trl_dpo(pc, pr, rc, rr, beta, loss_type, eps):
    """TRL ``DPOTrainer.dpo_loss``: logits = (pi_c - pi_r) - (ref_c - ref_r), per-pair losses, mean."""
    logits = (pc - pr) - (rc - rr)
    if loss_type == "sigmoid":
        out = -_logsig(beta * logits) * (1 - eps) - _logsig(-beta * logits) * eps
    elif loss_type == "robust":
        out = (-_logsig(beta * logits) * (1 - eps) + _logsig(-beta * logits) * eps) / (1 - 2 * eps)
    elif loss_type == "hinge":
        out = np.maximum(0.0, 1 - beta * logits)
    elif loss_type == "ipo":
        out = (logits - 1 / (2 * beta)) ** 2
    return out.mean(), beta * (pc - rc), beta * (pr - rr)


logps = st.lists(st.floats(-60.0, -0.5, width=32), min_size=N, max_size=N)


@hypothesis.given(
    logps,
    logps,
    logps,
    logps,
    st.floats(0.01, 2.0),
    st.sampled_from(losses.DPO_LOSS_TYPES),
    st.floats(0.0, 0.4),
)
def test_matches_trl_formulas(pc, pr, rc, rr, beta, loss_type, eps):
    args = [np.array(x, np.float32) for x in (pc, pr, rc, rr)]
    loss, m = losses.dpo_loss(*args, beta=beta, loss_type=loss_type, label_smoothing=eps)
    expected, cr, rj = trl_dpo(*(a.astype(np.float64) for a in args), beta, loss_type, eps)
    np.testing.assert_allclose(loss, expected, rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(m["rewards_chosen"], cr.mean(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(m["reward_accuracy"], np.mean(cr > rj), atol=1e-6)
    np.testing.assert_allclose(m["reward_margin"], (cr - rj).mean(), rtol=1e-4, atol=1e-4)


def test_closed_forms_at_zero_logit():
    """When the policy equals the reference (h = 0): sigmoid/robust give log 2, hinge 1, IPO 1/(4 beta^2)."""
    x = np.array([-3.0, -7.0], np.float32)
    y = np.array([-5.0, -1.0], np.float32)
    beta = 0.25
    for loss_type, value in [("sigmoid", np.log(2)), ("robust", np.log(2)), ("hinge", 1.0), ("ipo", 4.0)]:
        for eps in (0.0, 0.2) if loss_type in ("sigmoid", "robust") else (0.0,):
            loss, m = losses.dpo_loss(x, y, x, y, beta=beta, loss_type=loss_type, label_smoothing=eps)
            np.testing.assert_allclose(loss, value, rtol=1e-6, err_msg=f"{loss_type} eps={eps}")
            assert float(m["reward_margin"]) == 0.0


def test_robust_equals_sigmoid_without_smoothing_and_ipo_is_minimised_at_its_target():
    rng = np.random.default_rng(0)
    pc, pr, rc, rr = (rng.normal(-20, 3, size=N).astype(np.float32) for _ in range(4))
    a, _ = losses.dpo_loss(pc, pr, rc, rr, beta=0.3, loss_type="sigmoid")
    b, _ = losses.dpo_loss(pc, pr, rc, rr, beta=0.3, loss_type="robust")
    np.testing.assert_allclose(a, b, rtol=1e-6)
    # IPO: zero loss exactly when h = 1 / (2 beta)
    beta = 0.5
    loss, _ = losses.dpo_loss(rc + 1.0 / (2 * beta), rr, rc, rr, beta=beta, loss_type="ipo")
    np.testing.assert_allclose(loss, 0.0, atol=1e-8)


def test_gradient_raises_chosen_and_lowers_rejected():
    rng = np.random.default_rng(1)
    pc, pr, rc, rr = (rng.normal(-20, 3, size=N).astype(np.float32) for _ in range(4))
    for loss_type in ("sigmoid", "ipo", "robust"):
        g_c, g_r = jax.grad(
            lambda c, r, lt=loss_type: losses.dpo_loss(c, r, rc, rr, beta=0.1, loss_type=lt)[0],
            argnums=(0, 1),
        )(pc, pr)
        assert np.all(np.asarray(g_c) < 0) and np.all(np.asarray(g_r) > 0), loss_type


def test_bad_hyper_parameters_are_rejected():
    x = np.zeros(2, np.float32)
    with pytest.raises(ValueError, match="loss_type"):
        losses.dpo_loss(x, x, x, x, loss_type="kto")
    with pytest.raises(ValueError, match="label_smoothing"):
        losses.dpo_loss(x, x, x, x, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="beta"):
        losses.dpo_loss(x, x, x, x, beta=0.0)
