"""Direct Preference Optimisation losses (Rafailov et al. 2023) with TRL's loss variants.

Inputs are summed sequence log-probabilities [B] of the chosen (w) and rejected (l) responses under the policy
(pi) and the frozen reference (ref). With

    h_i = (log pi(y_w|x) - log pi(y_l|x)) - (log ref(y_w|x) - log ref(y_l|x))

and beta > 0, label smoothing eps, the per-pair losses are (as in TRL ``DPOTrainer.dpo_loss``):

    sigmoid  -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)              (DPO; cDPO when eps > 0)
    hinge    max(0, 1 - beta h)                                                     (SLiC)
    ipo      (h - 1 / (2 beta))^2                                                   (IPO, Azar et al. eq. 17)
    robust   [-(1 - eps) log sigmoid(beta h) + eps log sigmoid(-beta h)] / (1 - 2 eps)
                                                                                    (rDPO, Chowdhury et al.)

and the loss is their mean. TRL feeds IPO with length-averaged log-probs; pass those here for the same
behaviour. The implicit rewards are ``beta * (log pi - log ref)`` of each response.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust")


def dpo_loss(
    pi_chosen: jax.Array,  # [B]
    pi_rejected: jax.Array,  # [B]
    ref_chosen: jax.Array,  # [B]
    ref_rejected: jax.Array,  # [B]
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    mask: jax.Array | None = None,  # [B] 1 = real pair
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """DPO-family loss (module docstring). Returns ``(loss, metrics)``.

    Metrics: ``rewards_chosen``, ``rewards_rejected`` (mean implicit rewards), ``reward_accuracy``
    (fraction with chosen reward > rejected reward), ``reward_margin`` (mean difference), ``logits`` (mean h).
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"dpo_loss: unknown loss_type {loss_type!r}; choose one of {DPO_LOSS_TYPES}")
    if beta <= 0:
        raise ValueError(f"dpo_loss: beta must be > 0, got {beta}")
    if loss_type == "robust" and not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"dpo_loss: robust loss needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    pc, pr, rc, rr = (x.astype(jnp.float32) for x in (pi_chosen, pi_rejected, ref_chosen, ref_rejected))
    h = (pc - pr) - (rc - rr)
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1.0 - eps) * jax.nn.log_sigmoid(beta * h) - eps * jax.nn.log_sigmoid(-beta * h)
    elif loss_type == "hinge":
        losses = jax.nn.relu(1.0 - beta * h)
    elif loss_type == "ipo":
        losses = jnp.square(h - 1.0 / (2.0 * beta))
    else:  # robust
        losses = (-(1.0 - eps) * jax.nn.log_sigmoid(beta * h) + eps * jax.nn.log_sigmoid(-beta * h)) / (
            1.0 - 2.0 * eps
        )
    w = jnp.ones_like(h) if mask is None else mask.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(w), 1.0)

    def mean(x):
        return jnp.sum(jnp.where(w > 0, x, 0.0)) / n

    chosen_rewards = jax.lax.stop_gradient(beta * (pc - rc))
    rejected_rewards = jax.lax.stop_gradient(beta * (pr - rr))
    metrics = {
        "rewards_chosen": mean(chosen_rewards),
        "rewards_rejected": mean(rejected_rewards),
        "reward_accuracy": mean((chosen_rewards > rejected_rewards).astype(jnp.float32)),
        "reward_margin": mean(chosen_rewards - rejected_rewards),
        "logits": mean(jax.lax.stop_gradient(h)),
    }
    return mean(losses), metrics
