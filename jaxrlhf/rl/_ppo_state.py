"""The PPO train state, the frozen bases, and their shardings.

``PPOState`` holds only what the update changes; the frozen bases (``PPOFrozen``) are a separate, never
donated argument, so the sampler, the reference (base without adapters) and the reward model can share them.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from jaxrlhf import lora as lora_lib
from jaxrlhf import models, sharding
from jaxrlhf.losses import KLControllerState, RunningStats, running_reward_normalizer, seeded_reward_stats
from jaxrlhf.models import heads
from jaxrlhf.rl._ema import EMAState
from jaxrlhf.rl._ema import ema as make_ema
from jaxrlhf.rl._ppo_config import PPOHyperParams, PPOModels
from jaxrlhf.train.state import opt_state_shardings


class PPOState(NamedTuple):
    step: jax.Array  # int32 []: optimizer steps (one per minibatch)
    iteration: jax.Array  # int32 []: PPO updates (one per rollout)
    policy: Any  # trainable policy tree: full params, or LoRA adapters over PPOFrozen.policy_base
    critic: Any  # {"backbone": full params or adapters over PPOFrozen.critic_base, "head": value head}
    policy_opt: Any
    critic_opt: Any
    kl: KLControllerState
    reward_norm: RunningStats  # running statistics of the reward model's raw score (rollout's rm_stats)
    ema: EMAState | None  # EMA of ``policy`` (when PPOHyperParams.ema_decay is set)
    rng: jax.Array  # uint32 [2]


class PPOFrozen(NamedTuple):
    """Frozen base params: ``policy_base`` when the policy is LoRA, ``critic_base`` when the critic is (may
    be the very same arrays). None where that actor is trained in full."""

    policy_base: Any = None
    critic_base: Any = None


def _raw_key(rng: Any) -> jax.Array:
    if isinstance(rng, int):
        return jax.random.PRNGKey(rng)
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(rng)
    return jnp.asarray(rng, jnp.uint32)


def rm_stats(state: PPOState) -> jax.Array:
    """``[mean, std]`` of the running reward statistics: the ``rm_stats`` of the next ``rl.rollout``."""
    return jnp.stack([state.reward_norm.mean, jnp.sqrt(state.reward_norm.var)])


def _axes(spec, lora_config, tree: Any, base_axes: Any = None) -> Any:
    axes = models.param_axes(spec) if base_axes is None else base_axes
    return axes if lora_config is None else lora_lib.param_axes(axes, tree)


def policy_axes(ppo_models: PPOModels, policy: Any) -> Any:
    """Logical axes of the trainable policy tree (full params or adapters)."""
    return _axes(ppo_models.policy_spec, ppo_models.policy_lora, policy)


def critic_axes(ppo_models: PPOModels, critic: Any) -> Any:
    return {
        "backbone": _axes(ppo_models.critic_spec, ppo_models.critic_lora, critic["backbone"]),
        "head": heads.head_axes(),
    }


def ppo_state_shardings(ppo_models: PPOModels, state: PPOState, mesh: Mesh) -> PPOState:
    """PPOState of NamedShardings for ``state`` (arrays or ShapeDtypeStructs): params by their logical axes,
    optimizer moments like their parameter (``train.state.opt_state_shardings``), scalars replicated."""
    rep = sharding.replicated(mesh)
    p_sh = sharding.named_shardings(policy_axes(ppo_models, state.policy), mesh, state.policy)
    c_sh = sharding.named_shardings(critic_axes(ppo_models, state.critic), mesh, state.critic)
    return PPOState(
        step=rep,
        iteration=rep,
        policy=p_sh,
        critic=c_sh,
        policy_opt=opt_state_shardings(state.policy_opt, state.policy, p_sh, mesh),
        critic_opt=opt_state_shardings(state.critic_opt, state.critic, c_sh, mesh),
        kl=jax.tree.map(lambda _: rep, state.kl),
        reward_norm=jax.tree.map(lambda _: rep, state.reward_norm),
        ema=None if state.ema is None else EMAState(params=p_sh),
        rng=rep,
    )


def frozen_shardings(ppo_models: PPOModels, frozen: PPOFrozen, mesh: Mesh) -> PPOFrozen:
    def one(spec, tree):
        return None if tree is None else sharding.named_shardings(models.param_axes(spec), mesh, tree)

    return PPOFrozen(
        one(ppo_models.policy_spec, frozen.policy_base), one(ppo_models.critic_spec, frozen.critic_base)
    )


def init_ppo_state(
    ppo_models: PPOModels,
    hp: PPOHyperParams,
    policy: Any,
    critic: Any,
    *,
    policy_optimizer: optax.GradientTransformation,
    critic_optimizer: optax.GradientTransformation,
    rng: Any,
    reward_stats: dict | None = None,
    reward_stats_count: float = 1.0,
    mesh: Mesh | None = None,
) -> tuple[PPOState, PPOState | None]:
    """``(state, shardings)``: fresh optimizer states, the KL controller's initial coefficient, the reward
    statistics seeded from the RM's ``reward_stats`` (``{"mean", "std"}``; weight ``reward_stats_count``
    rewards; empty when None) and the EMA (a copy of ``policy``) when ``hp.ema_decay`` is set.

    ``critic = {"backbone": ..., "head": heads.init_head(...)}``. With ``mesh`` everything is placed by its
    logical axes (optimizer states created sharded); ``shardings`` is None without a mesh. The state may
    share buffers with ``policy`` / ``critic``; the update donates it, so pass copies if you keep those.
    """
    if set(critic) != {"backbone", "head"}:
        raise ValueError(f"init_ppo_state: critic must be {{'backbone', 'head'}}, got keys {sorted(critic)}")
    from jaxrlhf.rl.ppo import kl_controller  # the one place that builds the controller from hp

    if reward_stats is None:
        norm = running_reward_normalizer().init()
    else:
        norm = seeded_reward_stats(
            float(reward_stats["mean"]), float(reward_stats["std"]), count=reward_stats_count
        )
    key = _raw_key(rng)
    ema_fn = None if hp.ema_decay is None else make_ema(hp.ema_decay)

    def build(p, c):
        return PPOState(
            step=jnp.zeros((), jnp.int32),
            iteration=jnp.zeros((), jnp.int32),
            policy=p,
            critic=c,
            policy_opt=policy_optimizer.init(p),
            critic_opt=critic_optimizer.init(c),
            kl=kl_controller(hp).init(),
            reward_norm=norm,
            ema=None if ema_fn is None else ema_fn.init(p),
            rng=key,
        )

    if mesh is None:  # jitted too: every leaf its own buffer (a donated state may not alias itself)
        return jax.jit(build)(policy, critic), None
    shard = ppo_state_shardings(ppo_models, jax.eval_shape(build, policy, critic), mesh)
    state = jax.jit(build, out_shardings=shard)(policy, critic)
    return state, shard
