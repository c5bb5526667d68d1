"""The training loop: a plain function, composition only.

``train_loop(state, step_fn, batches, total_steps=..., eval_fn=..., ckpt_manager=..., writer=...)`` runs
``state, metrics = step_fn(state, batch)`` until ``state.step == total_steps`` and

- logs every ``log_every`` steps: the step's own metrics (loss, grad_norm, lr, ...) plus ``step_time`` (s),
  ``tokens_per_s`` and, with ``flops_per_token`` and ``peak_flops``, ``mfu``; to a tqdm bar, the writer's
  JSONL file and TensorBoard;
- every ``eval_every`` steps (and at the end) calls ``eval_fn(state) -> dict`` and logs ``eval/<name>``
  (see :func:`evaluate`: loss and perplexity);
- after each step offers the state (and ``batches.state()`` when the batch source has it) to
  ``ckpt_manager.save`` (which saves on its interval), and always saves at the end;
- on SIGINT / SIGTERM finishes the current step, saves a final checkpoint and returns with
  ``interrupted=True`` (the run resumes from there); a second Ctrl-C raises KeyboardInterrupt at once.

Metrics are fetched from the device only at log points, so steps queue without host syncs in between.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import numpy as np

from jaxrlhf.train.metrics import MetricsWriter, to_python
from jaxrlhf.train.state import TrainState


class LoopResult(NamedTuple):
    state: TrainState
    last_metrics: dict  # last logged train metrics (Python floats)
    eval_metrics: dict  # last eval metrics
    interrupted: bool  # stopped by a signal (a checkpoint was saved)


def default_tokens(batch: Any) -> int:
    """Tokens a batch computes on: the size of ``input_ids`` (all rows x length, micro-batches included)."""
    ids = (
        batch["input_ids"] if isinstance(batch, dict) and "input_ids" in batch else jax.tree.leaves(batch)[0]
    )
    return int(np.prod(np.shape(ids)))


def evaluate(eval_step: Callable[[TrainState, Any], dict], state: TrainState, batches: Iterable[Any]) -> dict:
    """Weighted mean of ``eval_step`` metrics over ``batches``; adds ``ppl = exp(loss)``.

    With ``weight`` = target tokens per batch this is the token-level mean NLL of the whole eval set.
    """
    sums: dict[str, float] = {}
    total = 0.0
    for batch in batches:
        m = to_python(eval_step(state, batch))
        w = m.pop("weight", 1.0)
        total += w
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + w * v
    if total == 0:
        raise ValueError("evaluate: the eval batches are empty")
    out = {k: v / total for k, v in sums.items()}
    out["ppl"] = math.exp(min(out["loss"], 80.0))
    return out


class _StopFlag:
    def __init__(self):
        self.stop = False
        self._old: dict = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signals can only be handled on the main thread

        def handler(signum, frame):
            if self.stop and signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the final checkpoint
            self.stop = True

        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, handler)

    def restore(self) -> None:
        for sig, h in self._old.items():
            signal.signal(sig, h)


def train_loop(
    state: TrainState,
    step_fn: Callable[[TrainState, Any], tuple[TrainState, dict]],
    batches: Iterable[Any],
    *,
    total_steps: int,
    eval_fn: Callable[[TrainState], dict] | None = None,
    eval_every: int = 0,
    ckpt_manager: Any = None,
    writer: MetricsWriter | None = None,
    log_every: int = 1,
    tokens_fn: Callable[[Any], int] = default_tokens,
    flops_per_token: float | None = None,
    peak_flops: float | None = None,
    progress: bool = True,
    handle_signals: bool = True,
) -> LoopResult:
    """Run steps until ``state.step == total_steps``; see the module docstring."""
    step = int(jax.device_get(state.step))
    it = iter(batches)
    loader_state = getattr(batches, "state", None)
    flag = _StopFlag()
    if handle_signals:
        flag.install()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=step, dynamic_ncols=True, leave=False)
    last, last_eval, pending = {}, {}, None
    t0, tokens, steps_in_window = time.perf_counter(), 0, 0
    try:
        while step < total_steps and not flag.stop:
            try:
                batch = next(it)
            except StopIteration:
                break
            tokens += tokens_fn(batch)
            state, metrics = step_fn(state, batch)
            step += 1
            steps_in_window += 1
            pending = metrics
            if step % log_every == 0 or step == total_steps:
                m = to_python(jax.device_get(pending))  # syncs: the window's steps are done
                dt = time.perf_counter() - t0
                m["step_time"] = dt / steps_in_window
                m["tokens_per_s"] = tokens / dt
                if flops_per_token and peak_flops:
                    m["mfu"] = flops_per_token * m["tokens_per_s"] / peak_flops
                last = m
                if writer is not None:
                    writer.write(step, m)
                if bar is not None:
                    bar.set_postfix(
                        loss=f"{m.get('loss', float('nan')):.4f}", tok_s=f"{m['tokens_per_s']:.0f}"
                    )
                t0, tokens, steps_in_window = time.perf_counter(), 0, 0
            if bar is not None:
                bar.update(1)
            if eval_fn is not None and eval_every and step % eval_every == 0 and step != total_steps:
                last_eval = _run_eval(eval_fn, state, step, writer)
                t0 = time.perf_counter()
            if ckpt_manager is not None:
                ckpt_manager.save(state, loader_state() if loader_state else None)
        if eval_fn is not None and (step == total_steps or flag.stop):
            last_eval = _run_eval(eval_fn, state, step, writer)
        if ckpt_manager is not None:
            ckpt_manager.save(state, loader_state() if loader_state else None, force=True)
            ckpt_manager.wait()
    finally:
        flag.restore()
        if bar is not None:
            bar.close()
    return LoopResult(state, last, last_eval, flag.stop)


def _run_eval(eval_fn, state, step, writer) -> dict:
    m = to_python(eval_fn(state))
    if writer is not None:
        writer.write(step, {f"eval/{k}": v for k, v in m.items()})
    return m
