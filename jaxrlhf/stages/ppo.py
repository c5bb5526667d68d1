"""PPO against a reward model: ``jaxrlhf ppo --config FILE.yaml --set key=value ...`` (InstructGPT step 3).

Each iteration samples ``data.batch_size`` prompts (x ``rollout.sampling.n``), generates with the policy,
scores the completions in one pass (old and reference log-probs, critic values, rewards:
:func:`jaxrlhf.rl.rollout.rollout`), and improves policy and critic with one jitted PPO update (epochs x
minibatches in one ``lax.scan``: :mod:`jaxrlhf.rl.ppo`). The actors:

- policy: ``model.path`` (an SFT stage checkpoint or a HF directory), full or LoRA (``lora``);
- reference: the frozen policy weights (full policy: one frozen copy; LoRA: the same base with the policy
  adapters left out, no copy);
- critic (``critic.init``): ``reward`` = the reward model's backbone and head (InstructGPT), ``policy`` =
  the policy's weights with a fresh value head; full, or LoRA (``critic.lora``) over that frozen backbone;
- reward (``reward``): a reward-model stage checkpoint (``reward.path``, normalised by a running normaliser
  seeded from its ``reward_stats.json``) and/or Python functions (``reward.function``, TRL's signature).
  A LoRA reward model trained on the policy's own base shares that base: policy, critic and reward are
  then three adapter sets on one frozen copy of the weights.

Everything goes under ``runs/<name>/``: ``config.yaml``, ``metrics.jsonl`` (+ TensorBoard) with one record
per iteration (reward raw / normalised, KL to the reference and its coefficient, entropy, clip fraction,
approx-KL, losses, explained variance, response length, stop fraction, ptx loss, seconds in rollout and
update), ``rollout_samples.jsonl`` (completions with their rewards every ``train.eval_every`` iterations),
``checkpoints/`` (Orbax: the whole PPO state + prompt order; a killed run resumes exactly), ``stage/``
(loadable by ``jaxrlhf generate --checkpoint``), ``export/hf`` (merged policy), ``export/peft`` (LoRA),
``samples.jsonl`` (the final policy's answers, scored by ``samples.rule``).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp

from jaxrlhf import data, rl, sharding
from jaxrlhf import lora as lora_lib
from jaxrlhf import train as train_lib
from jaxrlhf.generation import SamplingConfig
from jaxrlhf.models import heads
from jaxrlhf.models.attention import resolve_attention_impl
from jaxrlhf.rl import rollout as rollout_lib
from jaxrlhf.stages import _rl_loop, common, runner
from jaxrlhf.stages._rl_loop import RLResult, RLTrainConfig, RolloutConfig
from jaxrlhf.stages.common import CheckpointConfig, ExportConfig, ModelConfig, TokenizerConfig
from jaxrlhf.stages.samples import SampleConfig

logger = logging.getLogger("jaxrlhf.ppo")

__all__ = ["CriticConfig", "PPOConfig", "PPOResult", "RLState", "RolloutConfig", "run"]

PPOResult = RLResult  # run_dir, stage_dir ("" when interrupted), train / eval metrics, first_eval, samples


@dataclasses.dataclass(frozen=True)
class CriticConfig:
    """``init``: ``reward`` (the reward model's backbone and head; needs ``reward.path``), ``policy`` (the
    policy's weights and a fresh value head) or ``auto`` (reward when there is a reward model). ``lora``:
    train an adapter set over the frozen backbone instead of the whole critic."""

    init: Literal["auto", "reward", "policy"] = "auto"
    lora: lora_lib.LoraConfig | None = None


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    data: data.DataConfig  # prompts; batch_size = prompts per iteration
    name: str = "ppo"
    output_dir: str | None = None
    model: ModelConfig = ModelConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    lora: lora_lib.LoraConfig | None = None
    critic: CriticConfig = CriticConfig()
    reward: rl.RewardConfig = rl.RewardConfig()
    rollout: RolloutConfig = RolloutConfig()
    ppo: rl.PPOHyperParams = rl.PPOHyperParams()
    optim: train_lib.OptimConfig = train_lib.OptimConfig(lr=1e-5, schedule="constant", warmup_steps=0)
    critic_optim: train_lib.OptimConfig = train_lib.OptimConfig(lr=1e-5, schedule="constant", warmup_steps=0)
    ptx: data.DataConfig | None = None  # PPO-ptx pretraining data (used when ppo.ptx_coef > 0)
    train: RLTrainConfig = RLTrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig(every=10)
    export: ExportConfig = ExportConfig()
    samples: SampleConfig = SampleConfig(sampling=SamplingConfig(max_new_tokens=32, temperature=1.0))


class RLState(NamedTuple):
    """What the loop and checkpoints see: ``step`` = iterations done, ``ppo`` = the whole PPO state."""

    step: jax.Array
    ppo: rl.PPOState


# ---------------------------------------------------------------------------------------------- actors


def _critic_init(config: PPOConfig, r: runner.Run, rm: Any, dtype) -> tuple[Any, Any, Any]:
    """``(critic_spec, backbone to train or adapt, head)``."""
    init = config.critic.init
    if init == "auto":
        init = "reward" if rm is not None else "policy"
    if init == "reward":
        if rm is None:
            raise ValueError("critic.init=reward needs reward.path (a reward-model stage checkpoint)")
        spec, params, ad, ad_cfg, head = rm
        backbone = params if ad is None else lora_lib.merge(params, ad, ad_cfg)
        return spec, backbone, jax.tree.map(jnp.copy, head)
    head = heads.init_head(r.spec, r.fold(5), dtype=dtype)
    return r.spec, r.params, jax.device_put(head, sharding.replicated(r.mesh))


def _copy(tree):
    return jax.tree.map(jnp.copy, tree)


# ---------------------------------------------------------------------------------------------- run


def run(config: PPOConfig) -> PPOResult:
    """Run PPO (see the module docstring); resumes from ``checkpoints/`` if present."""
    r = runner.start(config, "ppo", safe_keys=_rl_loop.SAFE_KEYS)
    spec, mesh, dtype = r.spec, r.mesh, common.dtype_of(config.model.dtype)
    compute_dtype = common.dtype_of(config.model.compute_dtype)
    impl = resolve_attention_impl(config.model.attention_impl, compute_dtype)
    sampling = config.rollout.sampling
    hp = dataclasses.replace(
        config.ppo,
        temperature=sampling.temperature if sampling.temperature > 0 else 1.0,
        compute_dtype=config.model.compute_dtype,
        attention_impl=impl,
        remat=config.model.remat,
    )
    rows = config.data.batch_size * sampling.n
    if rows % hp.rows_divisor:
        raise ValueError(
            f"data.batch_size * rollout.sampling.n = {rows} rollout rows must divide by ppo.num_minibatches "
            f"* ppo.grad_accum = {hp.rows_divisor}"
        )
    rewards, rm = _rl_loop.build_stage_rewards(config.reward, r, dtype)
    prompts, dcfg = _rl_loop.prompt_loader(config, r, rewards)  # + a probe call of every Python reward
    c_spec, c_backbone, c_head = _critic_init(config, r, rm, dtype)
    lcfg, c_lcfg = config.lora, config.critic.lora
    base = r.params
    if lcfg is not None:
        policy, ref = lora_lib.init(spec, base, lcfg, r.fold(1), dtype=common.ADAPTER_DTYPE), None
    else:
        policy, ref = _copy(base), rl.Actor(spec, base)  # the state donates its copy; the reference stays
    if c_lcfg is not None:
        critic = {  # f32 adapters and value head on the frozen backbone (common.ADAPTER_DTYPE)
            "backbone": lora_lib.init(c_spec, c_backbone, c_lcfg, r.fold(6), dtype=common.ADAPTER_DTYPE),
            "head": jax.tree.map(lambda x: x.astype(common.ADAPTER_DTYPE), c_head),
        }
    else:
        critic = {"backbone": _copy(c_backbone), "head": c_head}
    frozen = rl.PPOFrozen(base if lcfg is not None else None, c_backbone if c_lcfg is not None else None)
    pm = rl.PPOModels(spec, c_spec, policy_lora=lcfg, critic_lora=c_lcfg)
    held = rollout_lib.parameter_bytes((base, ref, c_backbone, rewards.scorer))
    logger.info(
        "parameters held: %.1f MB (base %.1f MB; policy / reference / critic / reward share what they can)",
        held / 1e6, rollout_lib.parameter_bytes(base) / 1e6,
    )  # fmt: skip
    opt_p, opt_c = train_lib.make_optimizer(config.optim), train_lib.make_optimizer(config.critic_optim)
    # the policy's learning-rate factor (1 until the KL ceiling lowers it, train.kl_action=lower_lr) is in
    # the optimizer state whatever kl_action is, so kl_action may change on resume
    opt_p = train_lib.with_lr_scale(opt_p)
    stats = dict(zip(("mean", "std"), rewards.stats, strict=True)) if rewards.scorer is not None else None
    ppo_state, ppo_shard = rl.init_ppo_state(
        pm, hp, policy, critic, policy_optimizer=opt_p, critic_optimizer=opt_c, rng=r.fold(2),
        reward_stats=stats, reward_stats_count=100.0, mesh=mesh,
    )  # fmt: skip
    del policy, critic
    rep = sharding.replicated(mesh)
    update = rl.jit_ppo_update(
        rl.make_ppo_update(pm, hp, policy_optimizer=opt_p, critic_optimizer=opt_c),
        mesh=mesh, state_shardings=ppo_shard, frozen_shardings=rl.frozen_shardings(pm, frozen, mesh),
    )  # fmt: skip
    ptx = _ptx_loader(config, r, hp) if hp.ptx_coef > 0 else None

    def update_fn(st: RLState, ro, key):
        ppo_state, m = update(st.ppo, frozen, ro, key, next(ptx) if ptx is not None else None)
        return RLState(st.step + 1, ppo_state), m

    def policy_of(st: RLState, export: bool):
        pol = rl.export_policy(st.ppo) if export else st.ppo.policy  # the EMA when enabled
        return (base, pol) if lcfg is not None else (pol, None)

    def save_extras(st: RLState):
        sets = None
        if c_lcfg is not None and c_spec == spec and frozen.critic_base is base:
            sets = {"critic": (st.ppo.critic["backbone"], c_lcfg)}  # an adapter set on the same base
        return {"value_head": st.ppo.critic["head"]}, sets

    def scale_policy_lr(st: RLState, factor: float) -> RLState:
        return RLState(st.step, st.ppo._replace(policy_opt=train_lib.scale_lr(st.ppo.policy_opt, factor)))

    stage = _rl_loop.RLStage(
        RLState(jax.device_put(jnp.zeros((), jnp.int32), rep), ppo_state), RLState(rep, ppo_shard),
        models=lambda st: rl.rollout_models(pm, st.ppo, frozen, ref=ref), update=update_fn, policy=policy_of,
        rm_stats=lambda st: rl.rm_stats(st.ppo), save_extras=save_extras,
        loaders={"ptx": ptx.loader} if ptx is not None else {}, info={"frozen_bytes": held},
        scale_lr=scale_policy_lr, lr_scale=lambda st: train_lib.lr_scale(st.ppo.policy_opt),
    )  # fmt: skip
    return _rl_loop.run_loop(
        r, config, stage, rewards=rewards, prompts=prompts, dcfg=dcfg, sampling=sampling,
        compute_dtype=compute_dtype, attention_impl=impl, lora_config=lcfg,
    )  # fmt: skip


def _ptx_loader(config: PPOConfig, r: runner.Run, hp: rl.PPOHyperParams):
    """PPO-ptx batches (SFT-style rows of ``config.ptx``) as global arrays."""
    if config.ptx is None:
        raise ValueError("ppo.ptx_coef > 0 needs a ptx: data section (pretraining / SFT data)")
    pcfg = common.data_config(config.ptx, r.out)
    if pcfg.batch_size % hp.rows_divisor:
        raise ValueError(
            f"ptx.batch_size {pcfg.batch_size} must divide by ppo.num_minibatches * ppo.grad_accum "
            f"= {hp.rows_divisor}"
        )
    kind = "seq2seq" if r.spec.is_encoder_decoder else "sft"
    ds = runner.build_dataset(r, pcfg, kind)
    loader = data.Loader(ds, pcfg.batch_size, seed=pcfg.seed, shuffle=pcfg.shuffle)
    return runner.Batches(loader, r.mesh)
