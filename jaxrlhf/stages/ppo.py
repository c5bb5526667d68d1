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
import json
import logging
import os
import time
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf import data, rl, sharding
from jaxrlhf import lora as lora_lib
from jaxrlhf import train as train_lib
from jaxrlhf.generation import SamplingConfig
from jaxrlhf.models import heads
from jaxrlhf.models.attention import resolve_attention_impl
from jaxrlhf.rl import prompts as prompts_lib
from jaxrlhf.rl import rollout as rollout_lib
from jaxrlhf.stages import common, runner
from jaxrlhf.stages.common import CheckpointConfig, ExportConfig, LoopConfig, ModelConfig, TokenizerConfig
from jaxrlhf.stages.samples import SampleConfig, write_samples

logger = logging.getLogger("jaxrlhf.ppo")

__all__ = ["CriticConfig", "PPOConfig", "PPOResult", "PPOTrainConfig", "RolloutConfig", "run"]


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """How the policy samples during training (``n`` samples per prompt in ``sampling.n``); log-probs of
    the ratio are at ``sampling.temperature``, untruncated by top-k / top-p."""

    sampling: SamplingConfig = SamplingConfig(max_new_tokens=64, temperature=1.0)


@dataclasses.dataclass(frozen=True)
class CriticConfig:
    """``init``: ``reward`` (the reward model's backbone and head; needs ``reward.path``), ``policy`` (the
    policy's weights and a fresh value head) or ``auto`` (reward when there is a reward model). ``lora``:
    train an adapter set over the frozen backbone instead of the whole critic."""

    init: Literal["auto", "reward", "policy"] = "auto"
    lora: lora_lib.LoraConfig | None = None


@dataclasses.dataclass(frozen=True)
class PPOTrainConfig(LoopConfig):
    """Loop settings (:class:`~jaxrlhf.stages.common.LoopConfig`); ``iterations``: rollouts (each followed
    by one PPO update); ``eval_every``: write rollout samples and the samples' rule score every N
    iterations."""

    iterations: int = 100
    eval_every: int = 10


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
    train: PPOTrainConfig = PPOTrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig(every=10)
    export: ExportConfig = ExportConfig()
    samples: SampleConfig = SampleConfig(sampling=SamplingConfig(max_new_tokens=32, temperature=1.0))


class PPOResult(NamedTuple):
    run_dir: str
    stage_dir: str  # "" when interrupted
    train_metrics: dict  # last logged iteration's metrics
    eval_metrics: dict  # last samples summary (rule_score, ...)
    first_eval: dict  # before training (fresh runs only)
    samples: dict  # the final policy's samples summary


class RLState(NamedTuple):
    """What the loop and checkpoints see: ``step`` = iterations done, ``ppo`` = the whole PPO state."""

    step: jax.Array
    ppo: rl.PPOState


# ---------------------------------------------------------------------------------------------- actors


def _shares_base(rm_path: str, base_ref: dict | None) -> bool:
    """The RM stage is a LoRA adapter recorded over the very weights the policy was loaded from."""
    f = os.path.join(rm_path, "base.json")
    if base_ref is None or not os.path.isfile(f):
        return False
    with open(f) as fh:
        rec = json.load(fh)
    return (
        os.path.abspath(rec["path"]) == base_ref["path"] and rec.get("fingerprint") == base_ref["fingerprint"]
    )


def _rewards(config: PPOConfig, r: runner.Run, dtype) -> tuple[rl.Rewards, Any]:
    """The rewards, and the reward model's ``(spec, backbone, head)`` for an RM-initialised critic."""
    rc = config.reward
    rc.check(r.tokenizer)  # before anything compiles: importable functions, an RM stage, same tokenizer
    if rc.path and _shares_base(common.resolve_path(rc.path), r.base_ref):
        ck = train_lib.load_stage(rc.path, mesh=r.mesh, dtype=dtype, extras=("reward_head",), base=r.params)
        head = jax.device_put(ck.extras["reward_head"], sharding.replicated(r.mesh))
        scorer = rl.Scorer(ck.spec, r.params, head, ck.lora, ck.lora_config)
        stats = (float(ck.extras["reward_stats"]["mean"]), float(ck.extras["reward_stats"]["std"]))
        rewards = rl.build_rewards(
            dataclasses.replace(rc, path=None), r.tokenizer, mesh=r.mesh, scorer=scorer, stats=stats
        )
        logger.info("reward model %s: an adapter set on the policy's base (one copy of the weights)", rc.path)
        return rewards, (ck.spec, r.params, ck.lora, ck.lora_config, head)
    rewards = rl.build_rewards(rc, r.tokenizer, mesh=r.mesh, dtype=dtype)
    s = rewards.scorer
    return rewards, None if s is None else (s.spec, s.params, s.lora, s.lora_config, s.head)


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
    r = runner.start(config, "ppo", safe_keys=("train.iterations",))
    spec, mesh, dtype = r.spec, r.mesh, common.dtype_of(config.model.dtype)
    compute_dtype = common.dtype_of(config.model.compute_dtype)
    impl = resolve_attention_impl(config.model.attention_impl, compute_dtype)
    sampling = config.rollout.sampling
    hp = dataclasses.replace(
        config.ppo,
        temperature=sampling.temperature if sampling.temperature > 0 else 1.0,
        compute_dtype=config.model.compute_dtype,
        attention_impl=impl,
    )
    rows = config.data.batch_size * sampling.n
    if rows % hp.rows_divisor:
        raise ValueError(
            f"data.batch_size * rollout.sampling.n = {rows} rollout rows must divide by ppo.num_minibatches "
            f"* ppo.grad_accum = {hp.rows_divisor}"
        )
    rewards, rm = _rewards(config, r, dtype)
    dcfg = common.data_config(config.data, r.out)
    prompts = runner.primary_first(
        lambda: prompts_lib.build_prompt_loader(
            dcfg, r.tokenizer, mesh=mesh, encoder_decoder=spec.is_encoder_decoder
        ),
        "prompts",
    )
    _probe_functions(rewards, prompts.dataset)  # wrong length / non-numbers: an error before compiling
    c_spec, c_backbone, c_head = _critic_init(config, r, rm, dtype)
    lcfg, c_lcfg = config.lora, config.critic.lora
    base = r.params
    if lcfg is not None:
        policy, ref = lora_lib.init(spec, base, lcfg, r.fold(1), dtype=dtype), None
    else:
        policy, ref = _copy(base), rl.Actor(spec, base)  # the state donates its copy; the reference stays
    if c_lcfg is not None:
        critic = {
            "backbone": lora_lib.init(c_spec, c_backbone, c_lcfg, r.fold(6), dtype=dtype),
            "head": c_head,
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
    stats = dict(zip(("mean", "std"), rewards.stats, strict=True)) if rewards.scorer is not None else None
    ppo_state, ppo_shard = rl.init_ppo_state(
        pm, hp, policy, critic, policy_optimizer=opt_p, critic_optimizer=opt_c, rng=r.fold(2),
        reward_stats=stats, reward_stats_count=100.0, mesh=mesh,
    )  # fmt: skip
    del policy, critic
    rep = sharding.replicated(mesh)
    state = RLState(jax.device_put(jnp.zeros((), jnp.int32), rep), ppo_state)
    shard = RLState(rep, ppo_shard)
    update = rl.jit_ppo_update(
        rl.make_ppo_update(pm, hp, policy_optimizer=opt_p, critic_optimizer=opt_c),
        mesh=mesh, state_shardings=ppo_shard, frozen_shardings=rl.frozen_shardings(pm, frozen, mesh),
    )  # fmt: skip

    ptx = _ptx_loader(config, r, hp) if hp.ptx_coef > 0 else None
    mgr, state, loader_state = runner.restore(r, state, shard)
    if loader_state:
        prompts.restore(loader_state["prompts"])
        if ptx is not None:
            ptx.loader.restore(loader_state["ptx"])
    start_iter = int(jax.device_get(state.step))
    writer = runner.open_writer(r, start_iter)
    stop_ids = sampling.stop_token_ids if sampling.stop_token_ids is not None else spec.eos_token_ids
    last_rollout: dict = {}

    def policy_tree(st: RLState, *, export: bool = False):
        pol = rl.export_policy(st.ppo) if export else st.ppo.policy
        return (base, pol) if lcfg is not None else (pol, None)

    def step_fn(st: RLState, batch: prompts_lib.PromptBatch):
        it = int(jax.device_get(st.step))
        key = jax.random.fold_in(r.fold(7), it)
        models_ = rl.rollout_models(pm, st.ppo, frozen, ref=ref)
        timings: dict = {}
        ro = rollout_lib.rollout(
            models_, rewards, batch, jax.random.fold_in(key, 0), sampling, rm_stats=rl.rm_stats(st.ppo),
            compute_dtype=compute_dtype, attention_impl=impl, mesh=mesh, timings=timings,
        )  # fmt: skip
        t1 = time.perf_counter()
        ptx_batch = next(ptx) if ptx is not None else None
        ppo_state, m = update(st.ppo, frozen, ro, jax.random.fold_in(key, 1), ptx_batch)
        jax.block_until_ready(ppo_state.step)
        t2 = time.perf_counter()
        m = dict(m)
        m.update(
            **timings,
            update_seconds=t2 - t1,
            stop_fraction=jnp.mean(ro.ended.astype(jnp.float32)),
            response_length=jnp.mean(ro.lengths.astype(jnp.float32)),
        )
        for k, name in enumerate(rewards.names):
            m[f"reward/{name.split(':')[-1]}"] = jnp.nanmean(ro.reward_terms[:, k])
        last_rollout.update(batch=batch, rollout=ro, iteration=it + 1)
        return RLState(st.step + 1, ppo_state), m

    class _Prompts:
        def __iter__(self):
            return self

        def __next__(self):
            return next(prompts)

        def state(self):
            return {"prompts": prompts.state(), **({"ptx": ptx.loader.state()} if ptx is not None else {})}

    def eval_fn(st: RLState) -> dict:
        _write_rollout_samples(r, rewards, last_rollout, stop_ids)
        b, ad = policy_tree(st)
        it = int(jax.device_get(st.step))
        where = os.path.join(r.out, "samples", f"{it:06d}")
        os.makedirs(where, exist_ok=True)
        return write_samples(
            config.samples, where, spec, b, ad, lcfg, r.tokenizer,
            dcfg, mesh, r.fold(3), compute_dtype=compute_dtype,
        )  # fmt: skip

    first_eval = {}
    if start_iter == 0 and config.samples.num > 0:
        first_eval = eval_fn(state)
        if writer is not None:
            writer.write(0, {f"eval/{k}": v for k, v in first_eval.items()})
    result = train_lib.train_loop(
        state, step_fn, _Prompts(), total_steps=config.train.iterations,
        eval_fn=eval_fn if config.samples.num > 0 else None, eval_every=config.train.eval_every,
        ckpt_manager=mgr, writer=writer, log_every=config.train.log_every,
        tokens_fn=lambda b: rows * (int(np.shape(b.prompt_ids)[1]) + sampling.max_new_tokens),
        progress=config.train.progress and common.is_primary(),
    )  # fmt: skip
    mgr.close()
    state, it = result.state, int(jax.device_get(result.state.step))
    trained = runner.Trained(
        state, result.last_metrics, result.eval_metrics, first_eval, result.interrupted, writer
    )
    if result.interrupted:
        logger.warning("interrupted at iteration %d: checkpoint saved, rerun the same command to resume", it)
        runner.finish(trained, it)
        return PPOResult(r.out, "", result.last_metrics, result.eval_metrics, first_eval, {})
    b, ad = policy_tree(state, export=True)
    extras, sets = {"value_head": state.ppo.critic["head"]}, None
    if c_lcfg is not None and c_spec == spec and frozen.critic_base is base:
        sets = {"critic": (state.ppo.critic["backbone"], c_lcfg)}  # an adapter set on the same base
    stage_dir = runner.save(
        r, base=b, adapters=ad, lora_config=lcfg, extras=extras, adapter_sets=sets,
        info={"step": it, "iterations": it, "last": result.last_metrics, "frozen_bytes": held},
        export=config.export,
    )  # fmt: skip
    summary = write_samples(
        config.samples, r.out, spec, b, ad, lcfg, r.tokenizer, dcfg, mesh, r.fold(3),
        compute_dtype=compute_dtype,
    )  # fmt: skip
    runner.finish(trained, it, {f"samples/{k}": v for k, v in summary.items()})
    return PPOResult(r.out, stage_dir, result.last_metrics, result.eval_metrics, first_eval, summary)


def _probe_functions(rewards: rl.Rewards, ds) -> None:
    """Call every Python reward once on two prompts of the data (completions "" and "Sure.") and check
    what it returns (length, numbers), so a broken function fails before anything compiles."""
    from jaxrlhf.rl import rewards as rewards_lib

    rows = [ds.raw[i] for i in range(min(2, len(ds.raw)))]
    texts = [prompts_lib._prompt_text(row, prompts_lib._chat_messages(row)) for row in rows]
    columns = {k: [row.get(k) for row in rows] for k in rows[0] if k != "prompt"} if rows else {}
    probe = ["", "Sure."][: len(rows)]
    for name, fn in rewards.functions:
        try:
            rewards_lib.call_function(fn, name, texts, probe, columns)
        except (TypeError, ValueError) as e:
            raise ValueError(f"reward.function: {e} (checked on a probe call before training)") from None
        except Exception as e:
            raise ValueError(
                f"reward.function {name!r} raised {type(e).__name__}: {e} on a probe call before training "
                f"(prompts {texts!r}, completions {probe!r})"
            ) from e


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


def _write_rollout_samples(r: runner.Run, rewards, last: dict, stop_ids, k: int = 8) -> None:
    """The last rollout's first ``k`` completions with their rewards, appended to rollout_samples.jsonl."""
    if not last:
        return
    ro, batch = last["rollout"], last["batch"]
    tokens, mask = runner.host_array((ro.tokens, ro.mask))
    scores, terms = runner.host_array((ro.scores, ro.reward_terms))
    if not common.is_primary():
        return
    n = tokens.shape[0] // max(1, len(batch.prompts))
    with open(os.path.join(r.out, "rollout_samples.jsonl"), "a", encoding="utf-8") as f:
        for i in range(min(k, tokens.shape[0], len(batch.prompts) * n)):
            text = r.tokenizer.decode(tokens[i][mask[i] > 0], skip_special_tokens=True).strip()
            row = {"iteration": last["iteration"], "prompt": batch.prompts[i // n], "completion": text,
                   "score": float(scores[i])}  # fmt: skip
            row.update({name: float(terms[i, j]) for j, name in enumerate(rewards.names)})
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
