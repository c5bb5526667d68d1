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
  ``interrupted=True`` and ``stop_signal`` (the run resumes from there); a second Ctrl-C raises
  KeyboardInterrupt at once. SIGTERM is how Cloud TPU VMs, spot / preemptible instances, Slurm and
  Kubernetes announce preemption: no eval is run on the way out, only the checkpoint. On several
  processes (``jax.process_count() > 1``) the decision is agreed at every step boundary (see
  :func:`_agreed_signal`: an all-gather of each process's pending signal), so a signal that reaches
  one process stops all of them after the same step and they save the same checkpoint;
- counts the steps that the step function skipped for a non-finite loss or gradient (its ``skipped``
  metric, see :func:`jaxrlhf.train.step.make_train_step`): each is logged with its step, the running total is
  the ``nonfinite_skipped`` metric, and ``max_nonfinite_steps`` of them in a row stop the run with
  :class:`DivergenceError` *before* anything more is saved, so the newest checkpoint is the last one written
  before the streak (a skipped step leaves the params unchanged, so every checkpoint holds finite weights).

Metrics are fetched from the device only at log points, so steps queue without host syncs in between.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
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
    stop_signal: int | None = None  # signal.SIGTERM (preempted) or SIGINT when interrupted


class Preempted(KeyboardInterrupt):
    """SIGTERM outside a training loop under :func:`preemption_guard` (one process): the command stops at
    once; what was saved before stays, and rerunning the command resumes from the newest checkpoint."""


_last_stop: list[int | None] = [None]  # the signal that stopped this process's newest train_loop
_pending: list[int | None] = [None]  # a SIGTERM that arrived outside a loop (several processes)


def last_stop_signal() -> int | None:
    """The signal (``signal.SIGTERM`` / ``SIGINT``) that stopped the newest :func:`train_loop` of this
    process, or None when it ran to the end (or none ran): the command's exit status picks 143 / 130."""
    return _last_stop[0]


@contextlib.contextmanager
def preemption_guard() -> Iterator[None]:
    """Around a whole command (the CLI wraps every stage in it): SIGTERM *outside* a training loop.

    Inside :func:`train_loop` SIGTERM stops after the current step with a checkpoint (the loop's own
    handler). Outside one (start-up, compiling, the stage save, exports): on one process
    :class:`Preempted` is raised at once (nothing is in flight: the train checkpoints are complete and a
    stage save is atomic, a partial ``stage.tmp`` is never loaded); on several processes the signal is
    remembered and the next step boundary of a loop stops every process together (a process that left
    alone would leave the others waiting in a collective), or, after the last loop, the command finishes.
    Only on the main thread (signals cannot be handled elsewhere); elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if jax.process_count() == 1:
            raise Preempted(f"signal {signum}")
        _pending[0] = signum
        logger.warning("SIGTERM: every process stops at the next step boundary of the training loop")

    _pending[0] = None
    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
        _pending[0] = None


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
    """The signal this process received during the loop (``signum``; SIGTERM wins over SIGINT) and the
    one the processes agreed to stop on (``stop``, ``agreed``)."""

    def __init__(self):
        self.signum: int | None = _pending[0]  # a SIGTERM remembered by preemption_guard before the loop
        self.agreed: int | None = None
        self._old: dict = {}

    @property
    def stop(self) -> bool:
        return self.agreed is not None

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signals can only be handled on the main thread

        def handler(signum, frame):
            if self.signum is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the final checkpoint
            if self.signum != signal.SIGTERM:
                self.signum = signum
            if jax.process_count() == 1:
                self.agreed = self.signum

        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, handler)

    def restore(self) -> None:
        for sig, h in self._old.items():
            signal.signal(sig, h)

    def check(self, step: int) -> bool:
        """At a step boundary: whether to stop now (every process answers the same)."""
        if self.agreed is None:
            self.agreed = _agreed_signal(self.signum)
            if self.agreed is not None:
                name = "SIGTERM (preemption)" if self.agreed == signal.SIGTERM else "SIGINT"
                n = jax.process_count()
                logger.warning(
                    "%s: stopping after step %d, saving a checkpoint at step %d%s", name, step, step,
                    f"; all {n} processes stop here" if n > 1 else "",
                )  # fmt: skip
        return self.agreed is not None


def _agreed_signal(local: int | None) -> int | None:
    """The signal every process stops on at this step boundary, or None to go on.

    One process: its own. Several: an all-gather of each process's pending signal (0 = none), so all see the
    same answer at the same step; SIGTERM wins over SIGINT. This is used instead of JAX's preemption sync
    point (``multihost_utils.reached_preemption_sync_point``): that service catches SIGTERM in C++ (our
    handler, installed later, replaces it), and it agrees on a step counter that Orbax's ``save`` also
    feeds and that a notice arriving before a loop's first call (start-up, the next pipeline stage, a
    resumed run) leaves behind, so the loop could miss its sync point and never stop. The all-gather adds
    one tiny collective per step; the loop reads a scalar back from every step anyway (``skipped``)."""
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    got = np.asarray(multihost_utils.process_allgather(np.asarray(local or 0, np.int32)))
    if not got.any():
        return None
    return int(signal.SIGTERM) if (got == signal.SIGTERM).any() else int(got.max())


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
    step = start_step = int(jax.device_get(state.step))
    it = iter(batches)
    loader_state = getattr(batches, "state", None)
    flag = _StopFlag()
    _last_stop[0] = None
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
        while step < total_steps and not flag.check(step):
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
        preempted = flag.agreed == signal.SIGTERM  # save and go: the machine is about to disappear
        if eval_fn is not None and (step == total_steps or (flag.stop and not preempted)):
            last_eval = _run_eval(eval_fn, state, step, writer)
        if ckpt_manager is not None and (step > start_step or not flag.stop):
            ckpt_manager.save(state, loader_state() if loader_state else None, force=True)
        if ckpt_manager is not None:
            ckpt_manager.wait()
    finally:
        flag.restore()
        if bar is not None:
            bar.close()
    _last_stop[0] = flag.agreed
    return LoopResult(state, last, last_eval, flag.stop, flag.agreed)


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
