"""Losses of every stage: pure functions of arrays returning ``(loss, metrics)`` or arrays.

Hyper-parameters are keyword-only; stateful pieces (KL coefficient, reward statistics) are ``(init, update)``
pairs with NamedTuple state, like optax transformations.
"""

from ._aggregate import LOSS_AGGREGATIONS, aggregate_loss
from ._chunked import chunked_sft_loss, chunked_token_logprobs, next_token_targets
from ._dpo import DPO_LOSS_TYPES, dpo_loss
from ._entropy import token_entropy
from ._gae import gae
from ._grpo import (
    GRPO_LOSS_AGGREGATIONS,
    GRPO_LOSS_TYPES,
    group_reward_std,
    grpo_advantages,
    grpo_aggregate,
    grpo_loss,
    grpo_token_terms,
    rloo_advantages,
)
from ._kl import (
    KL_ESTIMATORS,
    KLController,
    KLControllerState,
    adaptive_kl_controller,
    fixed_kl_controller,
    kl_penalty,
)
from ._masked import masked_mean, masked_sum, masked_var, masked_whiten
from ._ppo import ppo_policy_loss, ppo_policy_terms, ppo_value_loss, ppo_value_terms
from ._reward import RewardNormalizer, RunningStats, normalize_rewards, reward_loss, running_reward_normalizer
from ._reward_shaping import clip_rewards, seeded_reward_stats, token_rewards
from ._sft import sft_loss, token_logprobs

__all__ = [
    "DPO_LOSS_TYPES",
    "GRPO_LOSS_AGGREGATIONS",
    "GRPO_LOSS_TYPES",
    "KL_ESTIMATORS",
    "KLController",
    "KLControllerState",
    "LOSS_AGGREGATIONS",
    "RewardNormalizer",
    "RunningStats",
    "adaptive_kl_controller",
    "aggregate_loss",
    "chunked_sft_loss",
    "chunked_token_logprobs",
    "clip_rewards",
    "dpo_loss",
    "fixed_kl_controller",
    "gae",
    "group_reward_std",
    "grpo_advantages",
    "grpo_aggregate",
    "grpo_loss",
    "grpo_token_terms",
    "kl_penalty",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "next_token_targets",
    "normalize_rewards",
    "ppo_policy_loss",
    "ppo_policy_terms",
    "ppo_value_loss",
    "ppo_value_terms",
    "reward_loss",
    "rloo_advantages",
    "running_reward_normalizer",
    "seeded_reward_stats",
    "sft_loss",
    "token_entropy",
    "token_logprobs",
    "token_rewards",
]
