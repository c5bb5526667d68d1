"""One stage runner: the plumbing every stage shares, composed by each stage in a page of its own code.

A stage supplies its loss (or its whole step, for RL), its batches and its extras; the runner owns the rest::

    run = runner.start(config, "sft")          # run dir + config fingerprint, config.yaml, mesh,
                                               # tokenizer, the model (HF dir / stage checkpoint / spec)
    out = runner.train(run, runner.Training(loss_fn, trainable, trainable_axes, frozen=base, ...),
                       dataset)                # optimizer, sharded state, jitted step (state donated, frozen
                                               # not), loader -> global batches, Orbax resume, first eval,
                                               # the loop with interrupt handling, JSONL/TensorBoard metrics
    stage_dir = runner.save(run, base=base, adapters=adapters, ...)   # stage checkpoint + HF / PEFT exports

The run directory knows its config: ``run.json`` holds the resolved config; rerunning the same ``name`` with
a config that differs in any key outside :data:`SAFE_TO_CHANGE` (and the stage's own safe keys) is refused
with a message naming the keys and the two ways out (a new ``name``, or ``checkpoint.resume=false``, which
starts the run over). A checkpoint that does not fit the model is refused the same way.

Multi-host: every process runs the same code on its own rows; host-local batches become global arrays with
``jax.make_array_from_process_local_data`` (:class:`Batches`), anything read back on the host is gathered
first (:func:`host_array`), and only process 0 writes logs, ``run.json`` / ``config.yaml`` and exports.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import NamedSharding

from jaxrlhf import data, models, sharding
from jaxrlhf import train as train_lib
from jaxrlhf.config import ConfigError, dump_yaml, to_dict
from jaxrlhf.stages import common

logger = logging.getLogger("jaxrlhf.runner")

# config keys (dotted prefixes) that may change when a run resumes: logging and eval cadence, where things
# are written, the mesh (checkpoints reshard), exports, samples, and the number of steps (to extend a run)
SAFE_TO_CHANGE = (
    "name",
    "output_dir",
    "train.eval_every",
    "train.eval_batches",
    "train.log_every",
    "train.tensorboard",
    "train.progress",
    "train.mesh",
    "checkpoint.every",
    "checkpoint.keep",
    "checkpoint.resume",
    "checkpoint.copy_base",
    "export",
    "samples",
    "optim.total_steps",
    "data.cache_dir",
    "tokenizer.cache_dir",
)
_OUTPUTS = ("checkpoints", "stage", "export", "metrics.jsonl", "tensorboard", "samples.jsonl", "run.json")


class RunConfigMismatch(ConfigError):
    """The run directory holds a run made with a different config (or a model its checkpoints do not fit)."""


@dataclasses.dataclass
class Run:
    """A started stage: where it writes, its mesh, tokenizer and model (see :func:`start`)."""

    config: Any
    stage: str
    out: str
    mesh: Any
    tokenizer: Any
    model_path: str | None
    spec: Any
    params: Any  # the loaded model, sharded on the mesh (a stage checkpoint's adapters merged in)
    base_ref: dict | None  # {"path", "fingerprint"} of the directory the weights came from (None: fresh)
    rng: jax.Array

    def fold(self, i: int) -> jax.Array:
        return jax.random.fold_in(self.rng, i)


# ---------------------------------------------------------------------------------------------- host / arrays


host_array = sharding.host_array  # the one gather-to-host helper (also used by rl/)


def primary_first(fn: Callable[[], Any], name: str) -> Any:
    """``fn()`` on process 0 first, then on the others (after a barrier): for work that fills a shared
    cache (the tiny tokenizer, the tokenized-data cache), so processes never write one file at once."""
    if jax.process_count() == 1:
        return fn()
    sync = train_lib.checkpoint.sync
    if common.is_primary():
        out = fn()
        sync(f"jaxrlhf-first:{name}")
        return out
    sync(f"jaxrlhf-first:{name}")
    return fn()


def build_dataset(run: Run, data_cfg: Any, kind: str) -> Any:
    """``data.build_dataset`` with the run's tokenizer, process 0 first (it fills the tokenized cache)."""
    return primary_first(lambda: data.build_dataset(data_cfg, run.tokenizer, kind=kind), f"data:{kind}")


def global_from_full(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """A batch that every process holds whole -> global arrays sharded along the batch axes."""

    def one(x):
        x = np.asarray(x)
        sh = sharding.batch_sharding(mesh, x.ndim)
        return jax.make_array_from_callback(x.shape, sh, lambda idx: x[idx])

    return {k: one(v) for k, v in batch.items()}


class Batches:
    """Loader -> global arrays, ``[k, B/k, ...]`` micro-batches when ``grad_accum = k > 1``; ``state()`` for
    the checkpoint. Each process passes its own rows (``jax.make_array_from_process_local_data``)."""

    def __init__(self, loader: data.Loader, mesh, grad_accum: int = 1):
        self.loader, self.mesh, self.k = loader, mesh, grad_accum

    def state(self) -> dict:
        return self.loader.state()

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.loader)
        if self.k == 1:
            return data.to_global(batch, self.mesh)
        out = {}
        for name, x in batch.items():
            if x.shape[0] % self.k:
                raise ValueError(f"per-host batch {x.shape[0]} is not divisible by optim.grad_accum={self.k}")
            x = x.reshape((self.k, x.shape[0] // self.k) + x.shape[1:])
            spec = sharding.logical_to_spec((None, "batch") + (None,) * (x.ndim - 2), self.mesh)
            out[name] = jax.make_array_from_process_local_data(NamedSharding(self.mesh, spec), x)
        return out


# ---------------------------------------------------------------------------------------------- start


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out if out or not prefix else {prefix[:-1]: d}
    return {prefix[:-1]: d}


def config_changes(old: dict, new: dict, safe: Iterable[str] = ()) -> list[str]:
    """Keys (dotted) whose values differ between two resolved configs and are not safe to change."""
    safe = tuple(SAFE_TO_CHANGE) + tuple(safe)
    a, b = _flatten(old), _flatten(new)
    keys = sorted(set(a) | set(b))

    def is_safe(k):
        return any(k == s or k.startswith(s + ".") for s in safe)

    return [
        f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}"
        for k in keys
        if a.get(k) != b.get(k) and not is_safe(k)
    ]


def _has_outputs(out: str) -> bool:
    ck = os.path.join(out, "checkpoints")
    return (os.path.isdir(ck) and bool(os.listdir(ck))) or os.path.isdir(os.path.join(out, "stage"))


def check_run_dir(out: str, stage: str, config: Any, *, safe: Iterable[str] = ()) -> None:
    """Refuse to resume a run directory made with another config; with ``checkpoint.resume=false`` clear
    the previous run's outputs so the run starts over. Then record this config (process 0)."""
    resolved = to_dict(config)
    run_file = os.path.join(out, "run.json")
    resume = config.checkpoint.resume
    if not resume and _has_outputs(out):
        logger.warning("checkpoint.resume=false: starting %s over (previous outputs removed)", out)
        if common.is_primary():
            for name in _OUTPUTS:
                p = os.path.join(out, name)
                shutil.rmtree(p) if os.path.isdir(p) else (os.path.exists(p) and os.remove(p))
        train_lib.checkpoint.sync(f"jaxrlhf-clear:{out}")
    elif os.path.isfile(run_file) and _has_outputs(out):
        import json

        with open(run_file) as f:
            old = json.load(f)
        if old.get("stage") != stage:
            raise RunConfigMismatch(
                f"{out} holds a {old.get('stage')!r} run, not {stage!r}: choose another name / output_dir"
            )
        changed = config_changes(old.get("config", {}), resolved, safe)
        if changed:
            raise RunConfigMismatch(
                f"{out} was run with a different config ({'; '.join(changed[:6])}"
                f"{'; ...' if len(changed) > 6 else ''}): resuming would mix the two. Use a new name "
                "(--set name=...) or --set checkpoint.resume=false to start this run over"
            )
    if common.is_primary():
        common.write_json(run_file, {"stage": stage, "config": resolved})
        dump_yaml(config, os.path.join(out, "config.yaml"))


def start(config: Any, stage: str, *, safe_keys: Iterable[str] = (), load_model: bool = True) -> Run:
    """Set a stage up (see the module docstring). ``config`` has the sections of the stage configs (``name``,
    ``output_dir``, ``model``, ``tokenizer``, ``train`` with ``mesh`` / ``seed``, ``checkpoint``)."""
    from jaxrlhf import compile_cache

    compile_cache.enable_compilation_cache()  # a rerun or resume of the same config skips compilation
    out = common.run_dir(config.name, config.output_dir)
    check_run_dir(out, stage, config, safe=safe_keys)
    tcfg = config.train
    mesh = common.make_mesh(tcfg.mesh)
    logger.info(
        "%s: process %d of %d, mesh %s", stage, jax.process_index(), jax.process_count(), _mesh_line(mesh)
    )
    model_path = common.resolve_path(config.model.path)
    tokenizer = primary_first(lambda: common.load_tokenizer(config.tokenizer, model_path, out), "tokenizer")
    rng = jax.random.PRNGKey(tcfg.seed)
    spec = params = base_ref = None
    if load_model:
        spec, params = common.load_model(config.model, model_path, tokenizer, mesh, rng)
        sharding.report_unsharded(
            models.param_axes(spec), params, mesh, strict=getattr(tcfg.mesh, "strict", False)
        )
        if model_path is not None:
            base_ref = {
                "path": os.path.abspath(model_path),
                "fingerprint": train_lib.weights_fingerprint(model_path),
            }
        logger.info("model %s: %.2fM params", spec.model_type, models.count_params(spec) / 1e6)
    return Run(config, stage, out, mesh, tokenizer, model_path, spec, params, base_ref, rng)


def _mesh_line(mesh) -> str:
    try:
        from jaxrlhf import distributed

        return distributed.describe_mesh(mesh)
    except (ImportError, AttributeError):
        return str(dict(mesh.shape))


# ---------------------------------------------------------------------------------------------- train


@dataclasses.dataclass
class Training:
    """What a stage hands to :func:`train`.

    ``loss_fn(trainable, frozen, batch, rng) -> (loss, metrics)`` (metrics may carry ``weight``);
    ``trainable`` / ``trainable_axes``: the tree the optimizer sees and its logical axes; ``frozen``: passed
    to the step unchanged and not donated (the base under LoRA; None for full fine-tuning); ``eval_fn(state,
    frozen) -> dict``: the stage's own evaluation (default: the weighted eval step over ``dataset.eval``);
    ``tokens_fn(batch)``: tokens per batch for throughput; ``seq_len``: for the FLOPs estimate.
    """

    loss_fn: Callable
    trainable: Any
    trainable_axes: Any
    frozen: Any = None
    eval_fn: Callable[[Any, Any], dict] | None = None
    tokens_fn: Callable[[Any], int] = train_lib.default_tokens
    seq_len: int = 0


class Trained(NamedTuple):
    state: Any
    train_metrics: dict  # last logged train metrics
    eval_metrics: dict  # last eval metrics
    first_eval: dict  # before training (fresh runs only; else {})
    interrupted: bool
    writer: Any  # the open MetricsWriter (process 0) or None; close with finish()


def default_eval_fn(loss_fn, eval_ds, batch_size: int, max_batches: int | None, mesh):
    """``eval_fn(state, frozen)``: the weighted mean of ``loss_fn``'s metrics over the eval split (each
    process reads its rows of each eval batch)."""
    import itertools

    n = len(eval_ds.data)
    bs = min(batch_size, n)
    bs -= bs % jax.process_count()
    if bs == 0:
        raise ValueError(f"the eval split ({n} rows) is smaller than the number of processes")
    eval_step = train_lib.make_eval_step(loss_fn)

    def eval_fn(state, frozen):
        loader = data.Loader(eval_ds, bs, shuffle=False, num_epochs=1)
        batches = (data.to_global(b, mesh) for b in loader)
        if max_batches is not None:
            batches = itertools.islice(batches, max_batches)
        with sharding.use_mesh(mesh):
            return train_lib.evaluate(lambda s, b: eval_step(s, b, frozen), state, batches)

    return eval_fn


def train(run: Run, t: Training, dataset: Any) -> Trained:
    """Optimizer, state, jitted step, loader, resume, first eval and the loop (see the module docstring).

    Reads ``run.config.optim`` (OptimConfig), ``.data`` (batch size, seed, shuffle), ``.checkpoint`` and
    ``.train`` (eval_every, eval_batches, log_every, tensorboard, progress)."""
    cfg, mesh = run.config, run.mesh
    optim, dcfg, tcfg = cfg.optim, cfg.data, cfg.train
    opt = train_lib.make_optimizer(optim)
    state, shard = train_lib.init_train_state(
        t.trainable, opt, run.fold(2), mesh=mesh, params_axes=t.trainable_axes
    )
    t.trainable = None  # the state owns (and donates) these buffers now
    step = train_lib.jit_train_step(
        train_lib.make_train_step(
            t.loss_fn, opt, grad_accum=optim.grad_accum, schedule=train_lib.make_schedule(optim)
        ),
        shard,
        mesh=mesh,
        grad_accum=optim.grad_accum,
    )
    loader = data.Loader(
        dataset, dcfg.batch_size, seed=dcfg.seed, shuffle=dcfg.shuffle, shuffle_buffer=dcfg.shuffle_buffer
    )
    mgr, state, loader_state = restore(run, state, shard)
    if loader_state:
        loader.restore(loader_state)
    start_step = int(jax.device_get(state.step))
    eval_fn = t.eval_fn
    if eval_fn is None and getattr(dataset, "eval", None) is not None:
        eval_fn = default_eval_fn(t.loss_fn, dataset.eval, dcfg.batch_size, tcfg.eval_batches, mesh)
    writer = open_writer(run, start_step)
    first_eval = {}
    if eval_fn is not None and start_step == 0:
        first_eval = train_lib.metrics.to_python(eval_fn(state, t.frozen))
        if writer is not None:
            writer.write(0, {f"eval/{k}": v for k, v in first_eval.items()})
        logger.info("eval at step 0: %s", first_eval)
    n_params = models.count_params(run.spec)
    flops = train_lib.flops_per_token(
        n_params, run.spec.num_layers, t.seq_len or dcfg.max_length, run.spec.hidden_size
    )
    try:
        result = train_lib.train_loop(
            state,
            lambda s, b: step(s, b, t.frozen),
            Batches(loader, mesh, optim.grad_accum),
            total_steps=optim.total_steps,
            eval_fn=(lambda s: eval_fn(s, t.frozen)) if eval_fn is not None else None,
            eval_every=tcfg.eval_every,
            ckpt_manager=mgr,
            writer=writer,
            log_every=tcfg.log_every,
            tokens_fn=t.tokens_fn,
            flops_per_token=flops,
            peak_flops=train_lib.peak_flops(jax.devices()[0].device_kind),
            progress=tcfg.progress and common.is_primary(),
            max_nonfinite_steps=tcfg.max_nonfinite_steps,
        )
    finally:
        mgr.close()  # pending async saves finish, also when the loop raises (divergence)
    logger.info("train: %s; eval: %s", result.last_metrics, result.eval_metrics)
    if result.interrupted:
        logger.warning(
            "%s at step %d: checkpoint saved, rerun the same command to resume",
            "preempted (SIGTERM)" if result.stop_signal == signal.SIGTERM else "interrupted",
            int(jax.device_get(result.state.step)),
        )
    return Trained(
        result.state, result.last_metrics, result.eval_metrics, first_eval, result.interrupted, writer
    )


def restore(run: Run, state: Any, shard: Any) -> tuple[Any, Any, dict | None]:
    """A CheckpointManager over ``<run>/checkpoints`` and the state / loader state of its newest complete
    checkpoint (``state`` unchanged when there is none). Any NamedTuple state works (RL stages)."""
    ckpt = run.config.checkpoint
    mgr = train_lib.CheckpointManager(
        os.path.join(run.out, "checkpoints"), save_interval_steps=ckpt.every, max_to_keep=ckpt.keep
    )
    try:
        state, loader_state = mgr.restore_latest(state, shard)
    except train_lib.CheckpointMismatchError as e:
        mgr.close()
        raise RunConfigMismatch(
            f"{e}. Use a new name (--set name=...) or --set checkpoint.resume=false to start over"
        ) from None
    if loader_state is not None:
        logger.info("resumed from %s at step %d", mgr.directory, int(jax.device_get(state.step)))
    return mgr, state, loader_state


def open_writer(run: Run, start_step: int):
    """The metrics writer (process 0; None elsewhere); records of steps after ``start_step`` (replayed by a
    resume) are dropped from ``metrics.jsonl`` first, so no step is written twice."""
    if not common.is_primary():
        return None
    return train_lib.MetricsWriter(run.out, tensorboard=run.config.train.tensorboard, keep_until=start_step)


# ---------------------------------------------------------------------------------------------- save


def save(
    run: Run,
    *,
    base: Any,
    adapters: Any = None,
    lora_config: Any = None,
    info: dict | None = None,
    extras: dict | None = None,
    json_extras: dict | None = None,
    adapter_sets: dict | None = None,
    export: common.ExportConfig | None = None,
) -> str:
    """Write the stage checkpoint (``stage/``) and the exports (``export/hf``, ``export/peft``).

    Under LoRA the base is recorded (``base.json``: path + fingerprint) instead of copied when it came from
    a directory and ``checkpoint.copy_base`` is false. ``adapter_sets`` (name -> (adapters, LoraConfig)):
    further adapter sets over the same base (e.g. PPO's critic), saved side by side."""
    from jaxrlhf import lora as lora_lib

    copy_base = getattr(run.config.checkpoint, "copy_base", False)
    record = adapters is not None and run.base_ref is not None and not copy_base
    with tempfile.TemporaryDirectory(dir=run.out, prefix=".tok-") as tok_dir:
        run.tokenizer.save_pretrained(tok_dir)
        stage_dir = train_lib.save_stage(
            os.path.join(run.out, "stage"),
            run.spec,
            None if record else base,
            lora=adapters,
            lora_config=lora_config,
            base=run.base_ref if record else None,
            tokenizer_dir=tok_dir,
            stage_info={"stage": run.stage, **(info or {}), "config": to_dict(run.config)},
            extras=extras,
            json_extras=json_extras,
            adapter_sets=adapter_sets,
        )
    logger.info("stage checkpoint: %s%s", stage_dir, " (base recorded, not copied)" if record else "")
    if export is None:
        return stage_dir
    if export.hf:
        merged = base if adapters is None else lora_lib.merge(base, adapters, lora_config)
        merged = host_array(merged)  # every process takes part in the gather; process 0 writes
        if common.is_primary():
            hf_dir = os.path.join(run.out, "export", "hf")
            models.save_pretrained(run.spec, merged, hf_dir)
            run.tokenizer.save_pretrained(hf_dir)
            logger.info("HF export: %s", hf_dir)
    if export.peft and adapters is not None:
        ad = host_array(adapters)
        if common.is_primary():
            peft_dir = os.path.join(run.out, "export", "peft")
            lora_lib.save_peft(run.spec, ad, lora_config, peft_dir, base_model=run.model_path)
            run.tokenizer.save_pretrained(peft_dir)
            logger.info("PEFT export: %s", peft_dir)
    train_lib.checkpoint.sync(f"jaxrlhf-export:{run.out}")
    return stage_dir


def finish(trained: Trained, step: int, summary: dict | None = None) -> None:
    """Write the end-of-stage summary metrics and close the writer."""
    if trained.writer is not None:
        if summary:
            trained.writer.write(step, summary)
        trained.writer.close()
