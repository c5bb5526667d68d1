"""RL building blocks shared by the PPO, GRPO and RLOO stages: rollouts, rewards, the PPO update.

Rollouts (modules ``rl.rollout``, ``rl.rewards``, ``rl.prompts``): ``rl.rollout.rollout(models, rewards,
prompt_batch, rng, sampling, rm_stats=...) -> Rollout`` (the function is not re-exported: ``rl.rollout`` stays
the module); log-probs everywhere from ``rl.completion_logprobs``.

PPO (``rl.ppo``)::

    ppo_models = rl.PPOModels(policy_spec, critic_spec, policy_lora=cfg_or_None, critic_lora=cfg_or_None)
    hp = rl.PPOHyperParams(epochs=4, num_minibatches=2, kl_target=6.0, ...)
    state, shard = rl.init_ppo_state(ppo_models, hp, policy, {"backbone": ..., "head": ...},
                                     policy_optimizer=opt_p, critic_optimizer=opt_c, rng=0, mesh=mesh)
    update = rl.jit_ppo_update(rl.make_ppo_update(ppo_models, hp, policy_optimizer=opt_p,
                                                  critic_optimizer=opt_c),
                               mesh=mesh, state_shardings=shard,
                               frozen_shardings=rl.frozen_shardings(ppo_models, frozen, mesh))
    state, metrics = update(state, rl.PPOFrozen(policy_base, critic_base), rollout, rng)
"""

from jaxrlhf.rl._ema import EMA, EMAState, ema
from jaxrlhf.rl._ppo_config import KL_MODES, PPOHyperParams, PPOModels
from jaxrlhf.rl._ppo_loss import make_ppo_loss
from jaxrlhf.rl._ppo_state import (
    PPOFrozen,
    PPOState,
    critic_axes,
    frozen_shardings,
    init_ppo_state,
    policy_axes,
    ppo_state_shardings,
    rm_stats,
)
from jaxrlhf.rl.ppo import (
    export_policy,
    jit_ppo_update,
    kl_controller,
    make_ppo_update,
    ppo_advantages,
    rollout_models,
)
from jaxrlhf.rl.rewards import RewardConfig, Rewards, build_rewards
from jaxrlhf.rl.rollout import (
    Actor,
    Critic,
    Rollout,
    RolloutModels,
    Scorer,
    completion_logprobs,
    decode_completions,
)

__all__ = [
    "Actor",
    "Critic",
    "EMA",
    "EMAState",
    "KL_MODES",
    "PPOFrozen",
    "PPOHyperParams",
    "PPOModels",
    "PPOState",
    "RewardConfig",
    "Rewards",
    "Rollout",
    "RolloutModels",
    "Scorer",
    "build_rewards",
    "completion_logprobs",
    "critic_axes",
    "decode_completions",
    "ema",
    "export_policy",
    "frozen_shardings",
    "init_ppo_state",
    "jit_ppo_update",
    "kl_controller",
    "make_ppo_loss",
    "make_ppo_update",
    "policy_axes",
    "ppo_advantages",
    "ppo_state_shardings",
    "rm_stats",
    "rollout_models",
]
from jaxrlhf.rl.grpo import (  # noqa: E402
    GRPOHyperParams,
    GRPOState,
    RLOOHyperParams,
    group_advantages,
    grpo_rollout_models,
    grpo_state_shardings,
    init_grpo_state,
    jit_grpo_update,
    make_grpo_loss,
    make_grpo_update,
)

__all__ += [
    "GRPOHyperParams",
    "GRPOState",
    "RLOOHyperParams",
    "group_advantages",
    "grpo_rollout_models",
    "grpo_state_shardings",
    "init_grpo_state",
    "jit_grpo_update",
    "make_grpo_loss",
    "make_grpo_update",
]
