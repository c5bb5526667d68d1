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
  ``interrupted=True`` (the run resumes from there); a second Ctrl-C raises KeyboardInterrupt at once;
- counts the steps that the step function skipped for a non-finite loss or gradient (its ``skipped``
  metric, see :func:`jaxrlhf.train.step.make_train_step`): each is logged with its step, the running total is
  the ``nonfinite_skipped`` metric, and ``max_nonfinite_steps`` of them in a row stop the run with
  :class:`DivergenceError` *before* anything more is saved, so the newest checkpoint is the last one written
  before the streak (a skipped step leaves the params unchanged, so every checkpoint holds finite weights).

Metrics are fetched from the device only at log points, so steps queue without host syncs in between.
"""

from __future__ import annotations

import logging
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

logger = logging.getLogger("jaxrlhf.train")


class DivergenceError(RuntimeError):
    """``max_nonfinite_steps`` steps in a row had a non-finite loss or gradient; the run was stopped.

    Attributes: ``steps`` (the skipped steps of the streak, 1-based), ``checkpoint`` (newest checkpoint step
    on disk, or None)."""

    def __init__(self, steps: list[int], checkpoint: int | None, directory: str | None):
        self.steps, self.checkpoint = steps, checkpoint
        where = (
            f"the last good checkpoint is step {checkpoint} in {directory}"
            if checkpoint is not None
            else "no checkpoint was written yet"
        )
        super().__init__(
            f"training diverged: the loss or gradient was NaN/inf at {len(steps)} steps in a row "
            f"(steps {steps[0]}-{steps[-1]}); each was skipped (params unchanged) and the run stopped; "
            f"{where}. "
            "Lower optim.lr, set optim.clip_norm, check the data rows of those steps, or use a wider "
            "compute dtype, then rerun (the run resumes from that checkpoint)"
        )


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
    max_nonfinite_steps: int = 3,
) -> LoopResult:
    """Run steps until ``state.step == total_steps``; see the module docstring.

    ``max_nonfinite_steps``: this many skipped (non-finite) steps in a row raise :class:`DivergenceError`
    (0 = never stop; skips are still counted)."""
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
    skipped_total, streak = 0, []
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
            if "skipped" in metrics and float(jax.device_get(metrics["skipped"])) > 0:
                skipped_total += 1
                streak.append(step)
                logger.warning(
                    "step %d: non-finite loss or gradient (loss %s, grad_norm %s): update skipped "
                    "(%d in a row, %d in all)",
                    step,
                    float(jax.device_get(metrics.get("loss", float("nan")))),
                    float(jax.device_get(metrics.get("grad_norm", float("nan")))),
                    len(streak),
                    skipped_total,
                )
                if max_nonfinite_steps and len(streak) >= max_nonfinite_steps:
                    raise _diverged(streak, ckpt_manager)
            else:
                streak = []
            if step % log_every == 0 or step == total_steps:
                m = to_python(jax.device_get(pending))  # syncs: the window's steps are done
                if "skipped" in m:
                    m["nonfinite_skipped"] = float(skipped_total)
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


def _diverged(streak: list[int], ckpt_manager: Any) -> DivergenceError:
    latest, directory = None, None
    if ckpt_manager is not None:
        ckpt_manager.wait()  # a save in flight completes (it holds the unchanged, finite params)
        latest, directory = ckpt_manager.latest_step(), getattr(ckpt_manager, "directory", None)
    return DivergenceError(list(streak), latest, directory)


def _run_eval(eval_fn, state, step, writer) -> dict:
    m = to_python(eval_fn(state))
    if writer is not None:
        writer.write(step, {f"eval/{k}": v for k, v in m.items()})
    return m
