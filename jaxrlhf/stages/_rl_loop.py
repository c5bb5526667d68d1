"""What every RL stage (PPO, GRPO, RLOO) shares around its update: rewards, prompts, the iteration loop.

A stage builds its state and update, describes them in an :class:`RLStage`, and :func:`run_loop` does the
rest on the stage runner: exact resume (state + prompt order), per-iteration rollout
(:func:`jaxrlhf.rl.rollout.rollout`) -> update, the common metrics (generation / scoring / update seconds,
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
import time
from collections.abc import Callable
from typing import Any, NamedTuple

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
    "RLResult",
    "RLStage",
    "RLTrainConfig",
    "RolloutConfig",
    "build_stage_rewards",
    "probe_functions",
    "prompt_loader",
    "run_loop",
    "write_rollout_samples",
]


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """How the policy samples during training (``sampling.n`` samples per prompt); log-probs of the ratio
    are at ``sampling.temperature``, untruncated by top-k / top-p."""

    sampling: SamplingConfig = SamplingConfig(max_new_tokens=64, temperature=1.0)


@dataclasses.dataclass(frozen=True)
class RLTrainConfig(LoopConfig):
    """Loop settings (:class:`~jaxrlhf.stages.common.LoopConfig`); ``iterations``: rollouts (each followed
    by one update); ``eval_every``: write rollout samples and the samples' rule score every N iterations."""

    iterations: int = 100
    eval_every: int = 10


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
    stage.json entries.
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

    def step_fn(st, batch: prompts_lib.PromptBatch):
        it = int(jax.device_get(st.step))
        key = jax.random.fold_in(r.fold(7), it)
        timings: dict = {}
        ro = rollout_lib.rollout(
            stage.models(st), rewards, batch, jax.random.fold_in(key, 0), sampling,
            rm_stats=None if stage.rm_stats is None else stage.rm_stats(st), compute_dtype=compute_dtype,
            attention_impl=attention_impl, mesh=mesh, timings=timings,
        )  # fmt: skip
        t1 = time.perf_counter()
        st, m = stage.update(st, ro, jax.random.fold_in(key, 1))
        jax.block_until_ready(st.step)
        m = dict(m)
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
    try:
        result = train_lib.train_loop(
            state, step_fn, batches, total_steps=config.train.iterations,
            eval_fn=eval_fn if config.samples.num > 0 else None, eval_every=config.train.eval_every,
            ckpt_manager=mgr, writer=writer, log_every=config.train.log_every,
            tokens_fn=lambda b: rows * (int(np.shape(b.prompt_ids)[1]) + sampling.max_new_tokens),
            progress=config.train.progress and common.is_primary(),
            max_nonfinite_steps=config.train.max_nonfinite_steps,
        )  # fmt: skip
    finally:
        mgr.close()  # pending async saves finish, also when the loop raises (divergence)
    state, it = result.state, int(jax.device_get(result.state.step))
    trained = runner.Trained(
        state, result.last_metrics, result.eval_metrics, first_eval, result.interrupted, writer
    )
    if result.interrupted:
        logger.warning("interrupted at iteration %d: checkpoint saved, rerun the same command to resume", it)
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
