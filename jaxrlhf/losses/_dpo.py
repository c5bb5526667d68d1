"""Direct Preference Optimisation losses (Rafailov et al. 2023) and the variants TRL's trainers compute.

Inputs are summed completion log-probabilities [B] of the chosen (w) and rejected (l) responses under the
policy (``pi``) and the frozen reference (``ref``), and the completion token counts ``n_w``, ``n_l`` [B]. With

    h_i  = (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))      (summed log-ratios)
    a_i  = (log pi(y_w|x) - log ref(y_w|x)) / n_w - (log pi(y_l|x) - log ref(y_l|x)) / n_l   (per token)
    s_i  = log pi(y_w|x) / n_w - log pi(y_l|x) / n_l                                  (no reference)

beta > 0 and label smoothing eps, the per-pair losses are:

    sigmoid  -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)     (DPO; cDPO when eps > 0)
    hinge    max(0, 1 - beta h)                                            (SLiC)
    ipo      (a - 1 / (2 beta))^2                                          (IPO, Azar et al. eq. 17, length-
                                                                            averaged as in TRL DPOTrainer)
    robust   [-(1 - eps) log sigmoid(beta h) + eps log sigmoid(-beta h)] / (1 - 2 eps)      (rDPO)
    simpo    -(1 - eps) log sigmoid(beta s - gamma) - eps log sigmoid(-(beta s - gamma))
                                                                           (SimPO, Meng et al.; no reference)

and the loss is their mean over the (unmasked) pairs. ``rpo_alpha > 0`` adds the RPO / "sft" term, the
negative log-likelihood of the chosen responses averaged over all their tokens in the batch (TRL's
``loss_type=["sigmoid", "sft"]``, ``loss_weights=[1, alpha]``):

    loss += alpha * -sum_i log pi(y_w,i|x_i) / sum_i n_w,i

Implicit rewards (metrics) are ``beta * (log pi - log ref)`` of each response (``beta * log pi / n`` for
SimPO). TRL's sigmoid no longer applies label smoothing (its robust does); here ``eps`` = 0 gives it exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust", "simpo")
REFERENCE_FREE = ("simpo",)  # loss types that never read reference log-probs


def _smoothed_sigmoid(z: jax.Array, eps: float) -> jax.Array:
    return -(1.0 - eps) * jax.nn.log_sigmoid(z) - eps * jax.nn.log_sigmoid(-z)


def dpo_loss(
    pi_chosen: jax.Array,  # [B] summed log-probs of the chosen completion
    pi_rejected: jax.Array,  # [B]
    ref_chosen: jax.Array | None = None,  # [B] (unused by simpo)
    ref_rejected: jax.Array | None = None,  # [B]
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_length: jax.Array | None = None,  # [B] completion tokens; needed by ipo, simpo and rpo_alpha
    rejected_length: jax.Array | None = None,  # [B]
    simpo_gamma: float = 0.5,
    rpo_alpha: float = 0.0,
    mask: jax.Array | None = None,  # [B] 1 = real pair
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """DPO-family loss (math in the module docstring). Returns ``(loss, metrics)``.

    Metrics (means over the real pairs, TRL's names): ``rewards/chosen``, ``rewards/rejected``,
    ``rewards/margins``, ``rewards/accuracies`` (chosen reward > rejected reward), ``logps/chosen``,
    ``logps/rejected`` (summed policy log-probs), ``logits`` (mean h, or s for simpo); ``nll`` (the RPO
    term, when lengths are given).
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"dpo_loss: unknown loss_type {loss_type!r}; choose one of {DPO_LOSS_TYPES}")
    if beta <= 0:
        raise ValueError(f"dpo_loss: beta must be > 0, got {beta}")
    if loss_type == "robust" and not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"dpo_loss: robust loss needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"dpo_loss: label_smoothing must be in [0, 1], got {label_smoothing}")
    if rpo_alpha < 0:
        raise ValueError(f"dpo_loss: rpo_alpha must be >= 0, got {rpo_alpha}")
    needs_length = loss_type in ("ipo", "simpo") or rpo_alpha > 0
    if needs_length and (chosen_length is None or rejected_length is None):
        raise ValueError(
            f"dpo_loss: loss_type {loss_type!r} / rpo_alpha need chosen_length and rejected_length"
        )
    reference_free = loss_type in REFERENCE_FREE
    if not reference_free and (ref_chosen is None or ref_rejected is None):
        raise ValueError(f"dpo_loss: loss_type {loss_type!r} needs ref_chosen and ref_rejected")

    pc, pr = pi_chosen.astype(jnp.float32), pi_rejected.astype(jnp.float32)
    zero = jnp.zeros_like(pc)
    rc = zero if reference_free else ref_chosen.astype(jnp.float32)
    rr = zero if reference_free else ref_rejected.astype(jnp.float32)
    if chosen_length is not None:
        nc = jnp.maximum(chosen_length.astype(jnp.float32), 1.0)
        nr = jnp.maximum(rejected_length.astype(jnp.float32), 1.0)
    eps = label_smoothing
    if loss_type == "simpo":
        logits = pc / nc - pr / nr
        losses = _smoothed_sigmoid(beta * logits - simpo_gamma, eps)
        chosen_rewards, rejected_rewards = beta * pc / nc, beta * pr / nr
    else:
        logits = (pc - rc) - (pr - rr)
        if loss_type == "sigmoid":
            losses = _smoothed_sigmoid(beta * logits, eps)
        elif loss_type == "hinge":
            losses = jax.nn.relu(1.0 - beta * logits)
        elif loss_type == "ipo":
            losses = jnp.square((pc - rc) / nc - (pr - rr) / nr - 1.0 / (2.0 * beta))
        else:  # robust
            losses = (
                -(1.0 - eps) * jax.nn.log_sigmoid(beta * logits) + eps * jax.nn.log_sigmoid(-beta * logits)
            ) / (1.0 - 2.0 * eps)
        chosen_rewards, rejected_rewards = beta * (pc - rc), beta * (pr - rr)

    w = jnp.ones_like(pc) if mask is None else mask.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(w), 1.0)

    def mean(x):
        return jnp.sum(jnp.where(w > 0, x, 0.0)) / n

    loss = mean(losses)
    metrics = {}
    if chosen_length is not None:
        nll = -jnp.sum(jnp.where(w > 0, pc, 0.0)) / jnp.maximum(jnp.sum(jnp.where(w > 0, nc, 0.0)), 1.0)
        if rpo_alpha > 0:
            loss = loss + rpo_alpha * nll
        metrics["nll"] = jax.lax.stop_gradient(nll)
    chosen_rewards, rejected_rewards = jax.lax.stop_gradient((chosen_rewards, rejected_rewards))
    metrics.update(
        {
            "rewards/chosen": mean(chosen_rewards),
            "rewards/rejected": mean(rejected_rewards),
            "rewards/margins": mean(chosen_rewards - rejected_rewards),
            "rewards/accuracies": mean((chosen_rewards > rejected_rewards).astype(jnp.float32)),
            "logps/chosen": mean(jax.lax.stop_gradient(pc)),
            "logps/rejected": mean(jax.lax.stop_gradient(pr)),
            "logits": mean(jax.lax.stop_gradient(logits)),
        }
    )
    return loss, metrics
