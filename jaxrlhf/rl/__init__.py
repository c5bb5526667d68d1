"""RL building blocks shared by the PPO, GRPO and RLOO stages: rollouts, rewards, the PPO update.

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
from jaxrlhf.rl.ppo import jit_ppo_update, kl_controller, make_ppo_update, ppo_advantages

__all__ = [
    "EMA",
    "EMAState",
    "KL_MODES",
    "PPOFrozen",
    "PPOHyperParams",
    "PPOModels",
    "PPOState",
    "critic_axes",
    "ema",
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
]
