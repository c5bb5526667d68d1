"""What every RL stage (PPO, GRPO, RLOO) shares around its update: rewards, prompts, the iteration loop.

A stage builds its state and update, describes them in an :class:`RLStage`, and :func:`run_loop` does the
rest on the stage runner: exact resume (state + prompt order), per-iteration rollout
(:func:`jaxrlhf.rl.rollout.rollout`) -> KL ceiling (``train.max_kl``, :class:`KLCeilingError`) -> update,
the common metrics (generation / scoring / update seconds,
stop fraction, response length, ``reward/<function>`` means), ``rollout_samples.jsonl`` and ``samples/``
every ``train.eval_every`` iterations, the stage checkpoint + exports, the final policy's samples::

    rewards, rm = build_stage_rewards(config.reward, run, dtype)
    prompts, dcfg = prompt_loader(config, run, rewards)          # + a probe call of every Python reward
    result = run_loop(run, config, RLStage(state, shard, models=..., update=..., policy=...), ...)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import time
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf import rl, sharding
from jaxrlhf import train as train_lib
from jaxrlhf.generation import SamplingConfig
from jaxrlhf.rl import prompts as prompts_lib
from jaxrlhf.rl import rollout as rollout_lib
from jaxrlhf.stages import common, runner
from jaxrlhf.stages.common import LoopConfig
from jaxrlhf.stages.samples import write_samples

logger = logging.getLogger("jaxrlhf.rl_loop")

__all__ = [
    "KL_ACTIONS",
    "SAFE_KEYS",
    "KLCeilingError",
    "RLResult",
    "RLStage",
    "RLTrainConfig",
    "RolloutConfig",
    "build_stage_rewards",
    "probe_functions",
    "prompt_loader",
    "rollout_kl",
    "run_loop",
    "write_rollout_samples",
]


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """How the policy samples during training (``sampling.n`` samples per prompt); log-probs of the ratio
    are at ``sampling.temperature``, untruncated by top-k / top-p."""

    sampling: SamplingConfig = SamplingConfig(max_new_tokens=64, temperature=1.0)


KL_ACTIONS = ("stop", "lower_lr")
# config keys an RL run may change on resume (beside the runner's SAFE_TO_CHANGE): more iterations, and the
# KL ceiling's value, action and factor (the stages' optimizers always carry the learning-rate factor, 1 until
# lower_lr changes it, so a checkpoint fits either action; a factor already lowered stays under stop)
SAFE_KEYS = ("train.iterations", "train.max_kl", "train.kl_action", "train.kl_lr_factor")


@dataclasses.dataclass(frozen=True)
class RLTrainConfig(LoopConfig):
    """Loop settings (:class:`~jaxrlhf.stages.common.LoopConfig`); ``iterations``: rollouts (each followed
    by one update); ``eval_every``: write rollout samples and the samples' rule score every N iterations.
    ``max_kl``: a ceiling on the KL to the reference, in nats per completion (the ``kl_ref`` metric: the
    mean over a rollout's completions of sum_t log pi(y_t) - log pi_ref(y_t)), checked on every rollout
    before its update; null = off. ``kl_action``: what a rollout above it does: ``stop`` (the run stops
    before that update with a message; the checkpoint of the policy over the ceiling is set aside in
    ``checkpoints-over-max-kl/``, so the newest checkpoint is the last one within it) or ``lower_lr`` (the
    policy's learning rate is multiplied by ``kl_lr_factor`` before that update and stays lowered; the
    factor is part of the checkpointed optimizer state). ``max_kl``, ``kl_action`` and ``kl_lr_factor`` may
    change when a run resumes (after a stop, resume with ``kl_action=lower_lr``)."""

    iterations: int = 100
    eval_every: int = 10
    max_kl: float | None = None
    kl_action: Literal["stop", "lower_lr"] = "stop"
    kl_lr_factor: float = 0.5

    def __post_init__(self):
        if self.max_kl is not None and not self.max_kl > 0:
            raise ValueError(f"train.max_kl must be > 0 (or null: no ceiling), got {self.max_kl}")
        if self.kl_action not in KL_ACTIONS:
            raise ValueError(f"train.kl_action must be one of {KL_ACTIONS}, got {self.kl_action!r}")
        if not 0.0 < self.kl_lr_factor < 1.0:
            raise ValueError(f"train.kl_lr_factor must be in (0, 1), got {self.kl_lr_factor}")


class KLCeilingError(RuntimeError):
    """A rollout's KL to the reference rose above ``train.max_kl`` under ``train.kl_action=stop``: the run
    stopped before that iteration's update. Attributes: ``iteration`` (1-based, the update not applied),
    ``kl``, ``max_kl``, ``checkpoint`` (the newest checkpoint step left, within the ceiling; None: none),
    ``set_aside`` (the directory the over-the-ceiling checkpoint was moved to, or None)."""

    def __init__(self, iteration: int, kl: float, max_kl: float):
        self.iteration, self.kl, self.max_kl = iteration, kl, max_kl
        self.checkpoint: int | None = None
        self.set_aside: str | None = None
        super().__init__(self._message(None))

    def _message(self, directory: str | None) -> str:
        it = self.iteration
        text = (
            f"the KL to the reference rose above train.max_kl at iteration {it}: {self.kl:.4g} > "
            f"{self.max_kl:g} nats per completion (the policy after iteration {it - 1}); the run stopped "
            f"before iteration {it}'s update"
        )
        if self.set_aside is not None:
            text += f"; the checkpoint of step {it - 1} (over the ceiling) was moved to {self.set_aside}"
        if directory is not None:
            text += (
                f"; the last checkpoint within the ceiling is step {self.checkpoint} in {directory}"
                if self.checkpoint is not None
                else "; no checkpoint within the ceiling was kept"
            )
        return text + (
            ". Lower optim.lr, strengthen the KL term (ppo.init_kl_coef / ppo.kl_target, grpo.beta), or set "
            "train.kl_action=lower_lr; or raise train.max_kl and rerun the same command (it resumes)"
        )

    def finish(self, checkpoint: int | None, directory: str, set_aside: str | None) -> KLCeilingError:
        self.checkpoint, self.set_aside = checkpoint, set_aside
        self.args = (self._message(directory),)
        return self


def rollout_kl(ro: Any) -> jax.Array:
    """KL(pi || pi_ref) per completion of the policy that sampled ``ro``, in nats (k1 estimate, f32 []):
    ``mean_r sum_t mask[r, t] * (logprobs[r, t] - ref_logprobs[r, t])`` over the [R, N] rollout; the same
    number as the stages' ``kl_ref`` metric."""
    mask = ro.mask.astype(jnp.float32)
    return jnp.mean(jnp.sum((ro.logprobs - ro.ref_logprobs).astype(jnp.float32) * mask, axis=1))


class RLResult(NamedTuple):
    run_dir: str
    stage_dir: str  # "" when interrupted
    train_metrics: dict  # last logged iteration's metrics
    eval_metrics: dict  # last samples summary (rule_score, ...)
    first_eval: dict  # before training (fresh runs only)
    samples: dict  # the final policy's samples summary


@dataclasses.dataclass(frozen=True, eq=False)
class RLStage:
    """A stage's state and functions for :func:`run_loop`.

    ``state``: a NamedTuple whose ``step`` counts iterations (checkpointed whole); ``shard``: its shardings;
    ``models(state)`` -> ``rl.RolloutModels``; ``update(state, rollout, rng)`` -> ``(next state with step
    + 1, metrics)``; ``policy(state, export)`` -> ``(base, adapters or None)`` to sample / export;
    ``rm_stats(state)``: the reward model's normaliser for the rollout (None: the RM's reward_stats.json);
    ``save_extras(state)`` -> ``(extras, adapter_sets)`` of the stage checkpoint; ``loaders``: other
    resumable iterators (``state()`` / ``restore()``) the update draws from (PPO-ptx); ``info``: more
    stage.json entries; ``scale_lr(state, factor)`` -> the state with the policy's learning rate times
    ``factor`` and ``lr_scale(state)`` -> that factor (``train.kl_action=lower_lr``; its optimizer made with
    :func:`jaxrlhf.train.with_lr_scale`).
    """

    state: Any
    shard: Any
    models: Callable[[Any], Any]
    update: Callable[[Any, Any, jax.Array], tuple[Any, dict]]
    policy: Callable[[Any, bool], tuple[Any, Any]]
    rm_stats: Callable[[Any], Any] | None = None
    save_extras: Callable[[Any], tuple[dict | None, dict | None]] | None = None
    loaders: dict = dataclasses.field(default_factory=dict)
    info: dict = dataclasses.field(default_factory=dict)
    scale_lr: Callable[[Any, float], Any] | None = None
    lr_scale: Callable[[Any], float | None] | None = None


# ---------------------------------------------------------------------------------------------- rewards


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


def build_stage_rewards(rc: rl.RewardConfig, r: runner.Run, dtype) -> tuple[rl.Rewards, Any]:
    """The rewards (checked before anything compiles), and the reward model's ``(spec, params, lora,
    lora_config, head)`` (None without one). A LoRA RM over the policy's own base shares that base."""
    rc.check(r.tokenizer)
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


def probe_functions(rewards: rl.Rewards, ds) -> None:
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


def prompt_loader(config: Any, r: runner.Run, rewards: rl.Rewards) -> tuple[Any, Any]:
    """``(prompt loader, resolved data config)`` of ``config.data``; the Python rewards are probed on it."""
    dcfg = common.data_config(config.data, r.out)
    prompts = runner.primary_first(
        lambda: prompts_lib.build_prompt_loader(
            dcfg, r.tokenizer, mesh=r.mesh, encoder_decoder=r.spec.is_encoder_decoder
        ),
        "prompts",
    )
    probe_functions(rewards, prompts.dataset)  # wrong length / non-numbers: an error before compiling
    return prompts, dcfg


def write_rollout_samples(r: runner.Run, rewards, last: dict, stop_ids, k: int = 8) -> None:
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


# ---------------------------------------------------------------------------------------------- the loop


class _Prompts:
    """The prompt loader (and the stage's other loaders) as the loop's resumable batch iterator."""

    def __init__(self, prompts, loaders: dict):
        self.prompts, self.loaders = prompts, loaders

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.prompts)

    def state(self):
        return {"prompts": self.prompts.state(), **{k: v.state() for k, v in self.loaders.items()}}

    def restore(self, st: dict):
        self.prompts.restore(st["prompts"])
        for k, v in self.loaders.items():
            v.restore(st[k])


def run_loop(
    r: runner.Run,
    config: Any,
    stage: RLStage,
    *,
    rewards: rl.Rewards,
    prompts: Any,
    dcfg: Any,
    sampling: SamplingConfig,
    compute_dtype: Any,
    attention_impl: str,
    lora_config: Any = None,
) -> RLResult:
    """Resume, iterate (rollout -> ``stage.update``), save the stage checkpoint, write the final samples."""
    spec, mesh = r.spec, r.mesh
    batches = _Prompts(prompts, stage.loaders)
    mgr, state, loader_state = runner.restore(r, stage.state, stage.shard)
    if loader_state:
        batches.restore(loader_state)
    start_iter = int(jax.device_get(state.step))
    writer = runner.open_writer(r, start_iter)
    stop_ids = sampling.stop_token_ids if sampling.stop_token_ids is not None else spec.eos_token_ids
    rows = config.data.batch_size * sampling.n
    last_rollout: dict = {}
    tcfg = config.train
    lower_lr = tcfg.kl_action == "lower_lr"
    if lower_lr and stage.scale_lr is None:
        raise ValueError(f"train.kl_action=lower_lr: the {r.stage} stage cannot lower its learning rate")

    def kl_ceiling(st, ro, it: int):
        """``train.max_kl`` on this rollout (of the policy after ``it`` updates): stop or lower the lr."""
        kl = float(jax.device_get(rollout_kl(ro)))
        if kl <= tcfg.max_kl:
            return st
        if not lower_lr:
            raise KLCeilingError(it + 1, kl, tcfg.max_kl)
        st = stage.scale_lr(st, tcfg.kl_lr_factor)
        logger.warning(
            "iteration %d: KL to the reference %.4g > train.max_kl %g: the policy's learning rate is "
            "multiplied by %g (now %g x optim.lr)", it + 1, kl, tcfg.max_kl, tcfg.kl_lr_factor,
            stage.lr_scale(st) if stage.lr_scale is not None else float("nan"),
        )  # fmt: skip
        return st

    def step_fn(st, batch: prompts_lib.PromptBatch):
        it = int(jax.device_get(st.step))
        key = jax.random.fold_in(r.fold(7), it)
        timings: dict = {}
        ro = rollout_lib.rollout(
            stage.models(st), rewards, batch, jax.random.fold_in(key, 0), sampling,
            rm_stats=None if stage.rm_stats is None else stage.rm_stats(st), compute_dtype=compute_dtype,
            attention_impl=attention_impl, mesh=mesh, timings=timings,
        )  # fmt: skip
        if tcfg.max_kl is not None:
            st = kl_ceiling(st, ro, it)
        t1 = time.perf_counter()
        st, m = stage.update(st, ro, jax.random.fold_in(key, 1))
        jax.block_until_ready(st.step)
        m = dict(m)
        if lower_lr and stage.lr_scale is not None:
            m["lr_scale"] = stage.lr_scale(st)
        m.update(
            **timings,
            update_seconds=time.perf_counter() - t1,
            stop_fraction=jnp.mean(ro.ended.astype(jnp.float32)),
            response_length=jnp.mean(ro.lengths.astype(jnp.float32)),
        )
        for k, name in enumerate(rewards.names):
            m[f"reward/{name.split(':')[-1]}"] = jnp.nanmean(ro.reward_terms[:, k])
        last_rollout.update(batch=batch, rollout=ro, iteration=it + 1)
        return st, m

    def eval_fn(st) -> dict:
        write_rollout_samples(r, rewards, last_rollout, stop_ids)
        b, ad = stage.policy(st, False)
        where = os.path.join(r.out, "samples", f"{int(jax.device_get(st.step)):06d}")
        os.makedirs(where, exist_ok=True)
        return write_samples(
            config.samples, where, spec, b, ad, lora_config, r.tokenizer, dcfg, mesh, r.fold(3),
            compute_dtype=compute_dtype,
        )  # fmt: skip

    first_eval = {}
    if start_iter == 0 and config.samples.num > 0:
        first_eval = eval_fn(state)
        if writer is not None:
            writer.write(0, {f"eval/{k}": v for k, v in first_eval.items()})
    stopped = None
    try:
        result = train_lib.train_loop(
            state, step_fn, batches, total_steps=config.train.iterations,
            eval_fn=eval_fn if config.samples.num > 0 else None, eval_every=config.train.eval_every,
            ckpt_manager=mgr, writer=writer, log_every=config.train.log_every,
            tokens_fn=lambda b: rows * (int(np.shape(b.prompt_ids)[1]) + sampling.max_new_tokens),
            progress=config.train.progress and common.is_primary(),
            max_nonfinite_steps=config.train.max_nonfinite_steps,
        )  # fmt: skip
    except KLCeilingError as e:
        stopped = e
    finally:
        mgr.close()  # pending async saves finish, also when the loop raises (divergence, KL ceiling)
    if stopped is not None:
        if writer is not None:
            writer.close()
        raise _set_aside_over_ceiling(r, stopped)
    state, it = result.state, int(jax.device_get(result.state.step))
    trained = runner.Trained(
        state, result.last_metrics, result.eval_metrics, first_eval, result.interrupted, writer
    )
    if result.interrupted:
        how = "preempted (SIGTERM)" if result.stop_signal == signal.SIGTERM else "interrupted"
        logger.warning("%s at iteration %d: checkpoint saved, rerun the same command to resume", how, it)
        runner.finish(trained, it)
        return RLResult(r.out, "", result.last_metrics, result.eval_metrics, first_eval, {})
    b, ad = stage.policy(state, True)
    extras, sets = stage.save_extras(state) if stage.save_extras is not None else (None, None)
    stage_dir = runner.save(
        r, base=b, adapters=ad, lora_config=lora_config, extras=extras, adapter_sets=sets,
        info={"step": it, "iterations": it, "last": result.last_metrics, **stage.info},
        export=config.export,
    )  # fmt: skip
    summary = write_samples(
        config.samples, r.out, spec, b, ad, lora_config, r.tokenizer, dcfg, mesh, r.fold(3),
        compute_dtype=compute_dtype,
    )  # fmt: skip
    runner.finish(trained, it, {f"samples/{k}": v for k, v in summary.items()})
    return RLResult(r.out, stage_dir, result.last_metrics, result.eval_metrics, first_eval, summary)


def _set_aside_over_ceiling(r: runner.Run, e: KLCeilingError) -> KLCeilingError:
    """After a KL stop (the checkpoint manager closed): move the checkpoint of the policy over the ceiling
    (step ``iteration - 1``, if one was written) to ``checkpoints-over-max-kl/``, so a rerun resumes from
    the last policy within the ceiling; the error names what is left."""
    ck = os.path.join(r.out, "checkpoints")
    bad = e.iteration - 1
    aside = None
    if bad > 0 and os.path.isdir(os.path.join(ck, str(bad))):
        aside = os.path.join(r.out, "checkpoints-over-max-kl", str(bad))
        if common.is_primary():
            os.makedirs(os.path.dirname(aside), exist_ok=True)
            if os.path.exists(aside):
                shutil.rmtree(aside)
            os.replace(os.path.join(ck, str(bad)), aside)
        train_lib.checkpoint.sync(f"jaxrlhf-kl-ceiling:{r.out}")
    left = sorted(int(n) for n in os.listdir(ck) if n.isdigit()) if os.path.isdir(ck) else []
    logger.error("KL ceiling: %s", e)
    return e.finish(left[-1] if left else None, ck, aside)
