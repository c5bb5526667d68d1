"""Training core: optimizer, train state, jitted step, Orbax checkpoints and the loop.

Typical wiring (a stage does this in a page)::

    from jaxrlhf import train
    cfg = train.OptimConfig(lr=2e-5, schedule="cosine", warmup_steps=10, total_steps=1000, grad_accum=2)
    opt = train.make_optimizer(cfg)
    state, shard = train.init_train_state(params, opt, rng, mesh=mesh, params_axes=models.param_axes(spec))
    step = train.jit_train_step(train.make_train_step(loss_fn, opt, grad_accum=cfg.grad_accum,
                                                      schedule=train.make_schedule(cfg)), shard, mesh=mesh,
                                grad_accum=cfg.grad_accum)
    mgr = train.CheckpointManager(out_dir / "checkpoints", save_interval_steps=100, max_to_keep=2)
    state, loader_state = mgr.restore_latest(state, shard)     # resume when a checkpoint exists
    if loader_state: loader.restore(loader_state)
    writer = train.MetricsWriter(out_dir / "logs")                 # JSONL + TensorBoard
    eval_step = train.make_eval_step(loss_fn)
    result = train.train_loop(state, step, loader, total_steps=1000, ckpt_manager=mgr, writer=writer,
                              eval_fn=lambda s: train.evaluate(eval_step, s, eval_batches), eval_every=200)
    state = result.state
    train.save_stage(out_dir / "final", spec, state.params, ...)

``loss_fn(params, frozen, batch, rng) -> (loss, metrics)``; under LoRA ``params`` are the adapters and
``frozen`` the base model, passed to the jitted step as ``step(state, batch, frozen)`` (not donated, not
in the state, not in train checkpoints). The stages wire all of this through :mod:`jaxrlhf.stages.runner`.
"""

from jaxrlhf.train.checkpoint import (
    CheckpointCorruptError,
    CheckpointManager,
    CheckpointMismatchError,
    StageCheckpoint,
    load_base,
    load_stage,
    save_stage,
    weights_fingerprint,
)
from jaxrlhf.train.loop import (
    DivergenceError,
    LoopResult,
    Preempted,
    default_tokens,
    evaluate,
    last_stop_signal,
    preemption_guard,
    train_loop,
)
from jaxrlhf.train.metrics import MetricsWriter, flops_per_token, peak_flops, read_jsonl
from jaxrlhf.train.optim import (
    LRScaleState,
    OptimConfig,
    decay_mask,
    lr_scale,
    make_optimizer,
    make_schedule,
    scale_lr,
    with_lr_scale,
)
from jaxrlhf.train.state import (
    TrainState,
    abstract_state,
    init_train_state,
    opt_state_shardings,
    state_shardings,
)
from jaxrlhf.train.step import batch_shardings, cast_floating, jit_train_step, make_eval_step, make_train_step

__all__ = [
    "CheckpointCorruptError",
    "CheckpointManager",
    "CheckpointMismatchError",
    "DivergenceError",
    "LoopResult",
    "MetricsWriter",
    "Preempted",
    "StageCheckpoint",
    "default_tokens",
    "evaluate",
    "flops_per_token",
    "last_stop_signal",
    "load_base",
    "load_stage",
    "peak_flops",
    "preemption_guard",
    "read_jsonl",
    "save_stage",
    "train_loop",
    "weights_fingerprint",
    "LRScaleState",
    "OptimConfig",
    "TrainState",
    "abstract_state",
    "batch_shardings",
    "cast_floating",
    "decay_mask",
    "init_train_state",
    "jit_train_step",
    "make_eval_step",
    "make_optimizer",
    "make_schedule",
    "make_train_step",
    "lr_scale",
    "scale_lr",
    "with_lr_scale",
    "opt_state_shardings",
    "state_shardings",
]
