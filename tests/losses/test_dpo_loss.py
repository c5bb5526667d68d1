"""dpo_loss against TRL's DPOTrainer / CPOTrainer formulas written independently in numpy, closed forms,
and properties of each loss type (hypothesis). Trainer-level parity with TRL: tests/stages/test_dpo_trl.py."""

import hypothesis
import hypothesis.strategies as st
import jax
import numpy as np
import pytest

from jaxrlhf import losses

N = 5


def _logsig(x):
    return -np.logaddexp(0.0, -x)


def trl_dpo(pc, pr, rc, rr, nc, nr, beta, loss_type, eps, gamma):
    """TRL 1.16 ``DPOTrainer._compute_loss`` (sigmoid, hinge, ipo, robust) and ``CPOTrainer.cpo_loss`` (simpo)
    in float64: per-pair losses and implicit rewards."""
    cr, rj = pc - rc, pr - rr  # log-ratios
    delta = cr - rj
    if loss_type == "sigmoid":
        out = -_logsig(beta * delta) * (1 - eps) - _logsig(-beta * delta) * eps
    elif loss_type == "robust":
        out = (-(1 - eps) * _logsig(beta * delta) + eps * _logsig(-beta * delta)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        out = np.maximum(0.0, 1 - beta * delta)
    elif loss_type == "ipo":
        out = (cr / nc - rj / nr - 1 / (2 * beta)) ** 2
    elif loss_type == "simpo":
        logits = pc / nc - pr / nr - gamma / beta
        out = -_logsig(beta * logits) * (1 - eps) - _logsig(-beta * logits) * eps
        return out, beta * pc / nc, beta * pr / nr
    return out, beta * cr, beta * rj


logps = st.lists(st.floats(-60.0, -0.5, width=32), min_size=N, max_size=N)
lengths = st.lists(st.integers(1, 40), min_size=N, max_size=N)


def _arrays(*xs):
    return [np.array(x, np.float32) for x in xs]


@hypothesis.given(
    logps, logps, logps, logps, lengths, lengths,
    st.floats(0.01, 2.0), st.sampled_from(losses.DPO_LOSS_TYPES), st.floats(0.0, 0.4), st.floats(0.0, 2.0),
)  # fmt: skip
def test_matches_trl_formulas(pc, pr, rc, rr, nc, nr, beta, loss_type, eps, gamma):
    args = _arrays(pc, pr, rc, rr, nc, nr)
    loss, m = losses.dpo_loss(
        *args[:4], beta=beta, loss_type=loss_type, label_smoothing=eps,
        chosen_length=args[4], rejected_length=args[5], simpo_gamma=gamma,
    )  # fmt: skip
    per_pair, cr, rj = trl_dpo(*(a.astype(np.float64) for a in args), beta, loss_type, eps, gamma)
    np.testing.assert_allclose(loss, per_pair.mean(), rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(m["rewards/chosen"], cr.mean(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(m["rewards/rejected"], rj.mean(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(m["rewards/accuracies"], np.mean(cr > rj), atol=1e-6)
    np.testing.assert_allclose(m["rewards/margins"], (cr - rj).mean(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(m["logps/chosen"], np.mean(pc), rtol=1e-5)
    np.testing.assert_allclose(m["nll"], -np.sum(pc) / np.sum(nc), rtol=1e-5)


@hypothesis.given(logps, logps, lengths, st.floats(0.01, 2.0), st.floats(0.0, 2.0))
def test_rpo_adds_the_chosen_token_mean_nll(pc, pr, nc, beta, alpha):
    """TRL's loss_type=["sigmoid", "sft"], loss_weights=[1, alpha]: sft = -mean over all chosen tokens."""
    pc, pr, nc = _arrays(pc, pr, nc)
    kw = dict(beta=beta, chosen_length=nc, rejected_length=nc)
    base, _ = losses.dpo_loss(pc, pr, pc - 1.0, pr, **kw)
    rpo, m = losses.dpo_loss(pc, pr, pc - 1.0, pr, rpo_alpha=alpha, **kw)
    np.testing.assert_allclose(rpo, base + alpha * (-np.sum(pc.astype(np.float64)) / np.sum(nc)), rtol=1e-4)
    np.testing.assert_allclose(m["nll"], -np.sum(pc) / np.sum(nc), rtol=1e-5)


@hypothesis.given(
    logps,
    logps,
    logps,
    logps,
    lengths,
    lengths,
    st.sampled_from(losses.DPO_LOSS_TYPES),
    st.integers(1, N - 1),
)
def test_masked_pairs_do_not_count(pc, pr, rc, rr, nc, nr, loss_type, keep):
    """Padding pairs (mask 0) change neither the loss nor its gradient nor the metrics."""
    pc, pr, rc, rr, nc, nr = _arrays(pc, pr, rc, rr, nc, nr)
    mask = (np.arange(N) < keep).astype(np.float32)
    s = slice(0, keep)

    def f(pc, pr, sl, mask=None):
        return losses.dpo_loss(
            pc, pr, rc[sl], rr[sl], beta=0.2, loss_type=loss_type, rpo_alpha=0.3,
            chosen_length=nc[sl], rejected_length=nr[sl], mask=mask,
        )  # fmt: skip

    (full, m_full), g_full = jax.value_and_grad(
        lambda a, b: f(a, b, slice(None), mask), (0, 1), has_aux=True
    )(pc, pr)
    (part, m_part), g_part = jax.value_and_grad(lambda a, b: f(a, b, s), (0, 1), has_aux=True)(pc[s], pr[s])
    np.testing.assert_allclose(full, part, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_full, g_part, strict=True):
        np.testing.assert_allclose(a[s], b, rtol=1e-5, atol=1e-7)
        assert np.all(np.asarray(a[keep:]) == 0)
    for k in m_part:
        np.testing.assert_allclose(m_full[k], m_part[k], rtol=1e-5, atol=1e-6, err_msg=k)


@hypothesis.given(logps, logps, logps, logps, st.floats(0.01, 2.0), st.floats(0.0, 0.45))
def test_label_smoothing_is_a_mixture_with_the_flipped_pair(pc, pr, rc, rr, beta, eps):
    """cDPO: loss_eps(w, l) = (1 - eps) loss_0(w, l) + eps loss_0(l, w)."""
    pc, pr, rc, rr = _arrays(pc, pr, rc, rr)
    smooth, _ = losses.dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)
    clean, _ = losses.dpo_loss(pc, pr, rc, rr, beta=beta)
    flipped, _ = losses.dpo_loss(pr, pc, rr, rc, beta=beta)
    np.testing.assert_allclose(smooth, (1 - eps) * clean + eps * flipped, rtol=1e-5, atol=1e-6)


@hypothesis.given(logps, logps, logps, logps, lengths, lengths, st.floats(0.05, 2.0), st.floats(0.0, 1.0))
def test_simpo_ignores_the_reference_and_ipo_is_length_invariant(pc, pr, rc, rr, nc, nr, beta, gamma):
    pc, pr, rc, rr, nc, nr = _arrays(pc, pr, rc, rr, nc, nr)
    kw = dict(beta=beta, chosen_length=nc, rejected_length=nr)
    a, _ = losses.dpo_loss(pc, pr, rc, rr, loss_type="simpo", simpo_gamma=gamma, **kw)
    b, _ = losses.dpo_loss(pc, pr, None, None, loss_type="simpo", simpo_gamma=gamma, **kw)
    np.testing.assert_allclose(a, b, rtol=1e-6)
    # IPO sees per-token log-ratios: repeating every completion token k times (log-probs and lengths x k)
    # leaves the loss unchanged, while the summed sigmoid's logit scales by k
    k = 3.0
    ipo1, _ = losses.dpo_loss(pc, pr, rc, rr, loss_type="ipo", **kw)
    ipo3, _ = losses.dpo_loss(k * pc, k * pr, k * rc, k * rr, loss_type="ipo",
                              beta=beta, chosen_length=k * nc, rejected_length=k * nr)  # fmt: skip
    np.testing.assert_allclose(ipo1, ipo3, rtol=1e-4, atol=1e-5)


def test_closed_forms():
    """Policy = reference (h = 0): sigmoid/robust log 2, hinge 1, IPO 1/(4 beta^2); SimPO: log 2 at
    beta s = gamma; IPO is zero exactly at a = 1 / (2 beta)."""
    x = np.array([-3.0, -7.0], np.float32)
    y = np.array([-5.0, -1.0], np.float32)
    n = np.array([2.0, 4.0], np.float32)
    beta = 0.25
    kw = dict(beta=beta, chosen_length=n, rejected_length=n)
    for loss_type, value in [("sigmoid", np.log(2)), ("robust", np.log(2)), ("hinge", 1.0), ("ipo", 4.0)]:
        for eps in (0.0, 0.2) if loss_type in ("sigmoid", "robust") else (0.0,):
            loss, m = losses.dpo_loss(x, y, x, y, loss_type=loss_type, label_smoothing=eps, **kw)
            np.testing.assert_allclose(loss, value, rtol=1e-6, err_msg=f"{loss_type} eps={eps}")
            assert float(m["rewards/margins"]) == 0.0 and float(m["rewards/accuracies"]) == 0.0
    s = x / n - y / n
    gamma = float(beta * s[0])
    loss, _ = losses.dpo_loss(x[:1], y[:1], loss_type="simpo", simpo_gamma=gamma, beta=beta,
                              chosen_length=n[:1], rejected_length=n[:1])  # fmt: skip
    np.testing.assert_allclose(loss, np.log(2), rtol=1e-6)
    rc = np.array([-4.0, -4.0], np.float32)
    loss, _ = losses.dpo_loss(rc + n / (2 * beta), y, rc, y, loss_type="ipo", **kw)
    np.testing.assert_allclose(loss, 0.0, atol=1e-8)
    a, _ = losses.dpo_loss(x, y, rc, y, beta=0.3, loss_type="sigmoid")
    b, _ = losses.dpo_loss(x, y, rc, y, beta=0.3, loss_type="robust")
    np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize("loss_type", losses.DPO_LOSS_TYPES)
def test_gradient_raises_chosen_and_lowers_rejected(loss_type):
    rng = np.random.default_rng(1)
    pc, pr, rc, rr = (rng.normal(-20, 3, size=N).astype(np.float32) for _ in range(4))
    n = rng.integers(1, 20, size=N).astype(np.float32)
    pc = rc - 5.0  # the hinge is active (beta h < 1) on every pair

    def f(c, r):
        return losses.dpo_loss(
            c, r, rc, rr, beta=0.1, loss_type=loss_type, chosen_length=n, rejected_length=n
        )[0]

    g_c, g_r = jax.grad(f, argnums=(0, 1))(pc, pr)
    assert np.all(np.asarray(g_c) < 0) and np.all(np.asarray(g_r) > 0), loss_type


def test_bad_arguments_are_rejected():
    x = np.zeros(2, np.float32)
    with pytest.raises(ValueError, match="loss_type"):
        losses.dpo_loss(x, x, x, x, loss_type="kto")
    with pytest.raises(ValueError, match="label_smoothing"):
        losses.dpo_loss(x, x, x, x, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="beta"):
        losses.dpo_loss(x, x, x, x, beta=0.0)
    with pytest.raises(ValueError, match="chosen_length"):
        losses.dpo_loss(x, x, x, x, loss_type="ipo")
    with pytest.raises(ValueError, match="chosen_length"):
        losses.dpo_loss(x, x, x, x, rpo_alpha=1.0)
    with pytest.raises(ValueError, match="needs ref_chosen"):
        losses.dpo_loss(x, x)
