"""GRPO: ``jaxrlhf grpo --config FILE.yaml --set key=value ...`` (group-relative policy optimisation).

Each iteration samples ``data.batch_size`` prompts x ``rollout.sampling.n`` completions (the group), scores
them in one pass (old log-probs; reference log-probs when ``grpo.beta > 0`` or ``train.max_kl`` is set;
rewards), and improves the policy with one jitted update (:mod:`jaxrlhf.rl.grpo`: group-normalised
advantages, TRL's loss types, epochs x minibatches in one ``lax.scan``). The actors: the policy
``model.path`` (an SFT stage checkpoint or a HF directory), full or LoRA; the reference (only with
``beta > 0`` or a KL ceiling) = the frozen starting weights (LoRA: the same base without adapters, no
copy); rewards: a reward-model stage checkpoint (``reward.path``) and/or Python functions
(``reward.function``), as in PPO. ``grpo.num_generations`` is ``rollout.sampling.n``.

Writes ``runs/<name>/`` like PPO: ``metrics.jsonl`` (per iteration: reward mean / std and per function,
group reward std, fraction of groups with zero std, completion length, stop fraction, clip fraction, KL,
entropy, losses, seconds in generation / scoring / update), ``rollout_samples.jsonl``, ``samples/``,
``checkpoints/`` (exact resume), ``stage/`` (for ``jaxrlhf generate --checkpoint``), ``export/hf``,
``export/peft`` (LoRA), ``samples.jsonl``.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxrlhf import data, rl, sharding
from jaxrlhf import lora as lora_lib
from jaxrlhf import train as train_lib
from jaxrlhf.generation import SamplingConfig
from jaxrlhf.models.attention import resolve_attention_impl
from jaxrlhf.rl import rollout as rollout_lib
from jaxrlhf.stages import _rl_loop, common, runner
from jaxrlhf.stages._rl_loop import RLResult, RLTrainConfig, RolloutConfig
from jaxrlhf.stages.common import CheckpointConfig, ExportConfig, ModelConfig, TokenizerConfig
from jaxrlhf.stages.samples import SampleConfig

logger = logging.getLogger("jaxrlhf.grpo")

__all__ = ["GRPOConfig", "GRPOResult", "RLState", "run", "run_group_stage"]

GRPOResult = RLResult


class RLState(NamedTuple):
    """What the loop and checkpoints see: ``step`` = iterations done, ``grpo`` = the update's state."""

    step: jax.Array
    grpo: rl.GRPOState


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    data: data.DataConfig  # prompts; batch_size = prompts per iteration
    name: str = "grpo"
    output_dir: str | None = None
    model: ModelConfig = ModelConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    lora: lora_lib.LoraConfig | None = None
    reward: rl.RewardConfig = rl.RewardConfig()
    rollout: RolloutConfig = RolloutConfig(SamplingConfig(max_new_tokens=64, temperature=1.0, n=8))
    grpo: rl.GRPOHyperParams = rl.GRPOHyperParams()
    optim: train_lib.OptimConfig = train_lib.OptimConfig(lr=1e-6, schedule="constant", warmup_steps=0)
    train: RLTrainConfig = RLTrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig(every=10)
    export: ExportConfig = ExportConfig()
    samples: SampleConfig = SampleConfig(sampling=SamplingConfig(max_new_tokens=32, temperature=1.0))


def run(config: GRPOConfig) -> RLResult:
    """Run GRPO (see the module docstring); resumes from ``checkpoints/`` if present."""
    return run_group_stage(config, "grpo", config.grpo)


def run_group_stage(config, stage_name: str, hp: rl.GRPOHyperParams) -> RLResult:
    """The GRPO / RLOO stage: ``config`` has the fields of :class:`GRPOConfig` (``hp`` its update section)."""
    r = runner.start(config, stage_name, safe_keys=_rl_loop.SAFE_KEYS)
    spec, mesh, dtype = r.spec, r.mesh, common.dtype_of(config.model.dtype)
    compute_dtype = common.dtype_of(config.model.compute_dtype)
    impl = resolve_attention_impl(config.model.attention_impl, compute_dtype)
    sampling = config.rollout.sampling
    section = stage_name
    if sampling.n < 2:
        raise ValueError(
            f"rollout.sampling.n = {sampling.n}: {section} needs groups of >= 2 samples per prompt"
        )
    hp = dataclasses.replace(
        hp, num_generations=sampling.n, temperature=sampling.temperature if sampling.temperature > 0 else 1.0,
        compute_dtype=config.model.compute_dtype, attention_impl=impl, remat=config.model.remat,
        max_completion_length=hp.max_completion_length or sampling.max_new_tokens,
    )  # fmt: skip
    rows = config.data.batch_size * sampling.n
    if rows % hp.rows_divisor:
        raise ValueError(
            f"data.batch_size * rollout.sampling.n = {rows} rollout rows must divide by "
            f"{section}.num_minibatches * {section}.grad_accum = {hp.rows_divisor}"
        )
    rewards, _ = _rl_loop.build_stage_rewards(config.reward, r, dtype)
    prompts, dcfg = _rl_loop.prompt_loader(config, r, rewards)
    lcfg, base = config.lora, r.params
    needs_ref = hp.beta > 0 or config.train.max_kl is not None  # the KL ceiling measures KL to it
    if lcfg is not None:
        policy, ref = lora_lib.init(spec, base, lcfg, r.fold(1), dtype=common.ADAPTER_DTYPE), None
    else:  # the state donates its copy; the reference (when used) keeps the loaded weights
        policy = jax.tree.map(jnp.copy, base)
        ref = rollout_lib.Actor(spec, base) if needs_ref else None
    frozen = base if lcfg is not None else None
    held = rollout_lib.parameter_bytes((frozen, ref, policy if lcfg is None else None, rewards.scorer))
    logger.info("parameters held: %.1f MB (policy, reference and reward share what they can)", held / 1e6)
    opt = train_lib.make_optimizer(config.optim)
    # the learning-rate factor (1 until the KL ceiling lowers it, train.kl_action=lower_lr) is in the
    # optimizer state whatever kl_action is, so kl_action may change on resume
    opt = train_lib.with_lr_scale(opt)
    inner, inner_shard = rl.init_grpo_state(spec, policy, optimizer=opt, rng=r.fold(2), lora_config=lcfg,
                                            mesh=mesh)  # fmt: skip
    del policy
    rep = sharding.replicated(mesh)
    state = RLState(jax.device_put(jnp.zeros((), jnp.int32), rep), inner)
    base_sh = None
    if frozen is not None:
        from jaxrlhf import models

        base_sh = sharding.named_shardings(models.param_axes(spec), mesh, frozen)
    update = rl.jit_grpo_update(
        rl.make_grpo_update(spec, hp, optimizer=opt, lora_config=lcfg),
        mesh=mesh, state_shardings=inner_shard, base_shardings=base_sh,
    )  # fmt: skip

    def models_of(st: RLState):
        return rl.grpo_rollout_models(spec, st.grpo, frozen, lora_config=lcfg, ref=ref, no_ref=not needs_ref)

    def update_fn(st: RLState, ro, key):
        inner_new, m = update(st.grpo, frozen, ro, key)
        return RLState(st.step + 1, inner_new), m

    def policy_of(st: RLState, export: bool):
        return (base, st.grpo.policy) if lcfg is not None else (st.grpo.policy, None)

    stage = _rl_loop.RLStage(
        state, RLState(rep, inner_shard), models=models_of, update=update_fn, policy=policy_of,
        info={"frozen_bytes": held, "advantage": hp.advantage, "loss_type": hp.loss_type},
        scale_lr=lambda st, f: RLState(st.step, st.grpo._replace(opt=train_lib.scale_lr(st.grpo.opt, f))),
        lr_scale=lambda st: train_lib.lr_scale(st.grpo.opt),
    )  # fmt: skip
    return _rl_loop.run_loop(
        r, config, stage, rewards=rewards, prompts=prompts, dcfg=dcfg, sampling=sampling,
        compute_dtype=compute_dtype, attention_impl=impl, lora_config=lcfg,
    )  # fmt: skip
