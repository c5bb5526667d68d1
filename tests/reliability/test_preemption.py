"""Preemption: SIGTERM (how Cloud TPU VMs, spot instances, Slurm and Kubernetes announce it) makes a training
loop finish its step, save a checkpoint of that step and stop; the command exits with status 143 (128 +
SIGTERM; Ctrl-C stays 130). On several processes every process stops after the same step and they save one
checkpoint together, whichever process got the signal: the two-process ``jax.distributed`` setup of
``tests/stages/test_multihost.py`` (2 CPU processes running ``jaxrlhf sft``) gets SIGTERM on process 1 only,
both exit 143 after logging the same step, that step's checkpoint is on disk, and the rerun of the same
command (both processes) resumes from it and finishes with every step logged once.

In-process: the loop's stop and checkpoint on SIGTERM (no eval on the way out) and on SIGINT (eval kept);
outside a loop, :func:`jaxrlhf.train.preemption_guard` turns SIGTERM into :class:`jaxrlhf.train.Preempted`.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf import train
from tests.stages.test_multihost import SFT, TIMEOUT, _cmd, _env, _free_port


class _State(NamedTuple):
    step: jnp.ndarray


class _Manager:
    """A checkpoint manager that records the steps it was asked to save."""

    def __init__(self, every: int):
        self.every, self.saved = every, []

    def save(self, state, loader_state=None, *, force=False):
        step = int(state.step)
        if (force or step % self.every == 0) and step not in self.saved:
            self.saved.append(step)

    def wait(self):
        pass


def _loop(sig: int, at: int, evals: list):
    def step_fn(state, batch):
        if int(state.step) + 1 == at:
            os.kill(os.getpid(), sig)  # arrives while step `at` is in progress
        return _State(state.step + 1), {"loss": jnp.float32(batch)}

    mgr = _Manager(every=100)
    result = train.train_loop(
        _State(jnp.int32(0)), step_fn, iter(range(1000)), total_steps=20, ckpt_manager=mgr,
        eval_fn=lambda s: evals.append(int(s.step)) or {"loss": 0.0}, eval_every=100, progress=False,
    )  # fmt: skip
    return result, mgr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_signal_in_the_loop_saves_the_step_it_stops_at(sig):
    before = signal.getsignal(sig)
    evals: list = []
    result, mgr = _loop(sig, 5, evals)
    assert result.interrupted and result.stop_signal == sig == train.last_stop_signal()
    assert int(result.state.step) == 5 and mgr.saved == [5]
    # SIGTERM: the machine is going away, the checkpoint only; Ctrl-C: the eval at the stop as before
    assert evals == ([] if sig == signal.SIGTERM else [5])
    assert signal.getsignal(sig) is before  # the loop's handler is gone again


def test_a_run_to_the_end_has_no_stop_signal():
    mgr = _Manager(every=4)
    result = train.train_loop(
        _State(jnp.int32(0)), lambda s, b: (_State(s.step + 1), {}), iter(range(10)), total_steps=6,
        ckpt_manager=mgr, progress=False,
    )  # fmt: skip
    assert not result.interrupted and result.stop_signal is None and train.last_stop_signal() is None
    assert mgr.saved == [4, 6]


def test_sigterm_outside_a_loop_raises_preempted():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(train.Preempted):
        with train.preemption_guard():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1.0)  # the handler runs at the next bytecode boundary
    assert signal.getsignal(signal.SIGTERM) is before
    with train.preemption_guard():  # inside the guard a loop still stops with its checkpoint
        result, mgr = _loop(signal.SIGTERM, 3, [])
    assert result.stop_signal == signal.SIGTERM and mgr.saved == [3]


# ---------------------------------------------------------------------------------------------- 2 processes


def _two(sets: list[str], logs: list[str], cache: str, *, sigterm_when=None) -> list[int]:
    """Run both processes of ``jaxrlhf sft`` (logs to ``logs``; compiled programs cached in ``cache``, so
    the rerun loads them); ``sigterm_when()`` -> True sends SIGTERM to process 1 only (once). Returns the
    exit statuses."""
    port = _free_port()
    files = [open(p, "w") for p in logs]
    procs = []
    for rank, f in zip((0, 1), files, strict=True):
        env = dict(_env(2, rank, port), JAXRLHF_COMPILATION_CACHE=cache)
        procs.append(subprocess.Popen(_cmd("sft", SFT, sets), env=env, stdout=f, stderr=subprocess.STDOUT))
    deadline, sent = time.time() + TIMEOUT, False
    try:
        while any(p.poll() is None for p in procs):
            if time.time() > deadline:
                raise AssertionError(f"a process hung (> {TIMEOUT} s); logs: {logs}")
            if sigterm_when is not None and not sent and sigterm_when():
                procs[1].send_signal(signal.SIGTERM)
                sent = True
            time.sleep(0.02)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(30)
        for f in files:
            f.close()
    assert sigterm_when is None or sent, "the run ended before the signal was sent"
    return [p.returncode for p in procs]


def _read(path) -> str:
    with open(path) as f:
        return f.read()


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_one_step(tmp_path):
    out = tmp_path / "sft"
    sets = [
        f"output_dir={out}", f"tokenizer.cache_dir={tmp_path / 'tok'}", f"data.cache_dir={tmp_path / 'data'}",
        "optim.schedule=constant", "optim.warmup_steps=0", "optim.total_steps=400", "checkpoint.every=1000",
        "train.eval_every=1000", "train.log_every=1", "train.progress=false", "train.tensorboard=false",
        "samples.num=0", "export.hf=false",
    ]  # fmt: skip
    metrics = out / "metrics.jsonl"

    def two_steps_logged():
        return metrics.is_file() and metrics.read_text().count('"loss"') >= 2

    logs = [str(tmp_path / f"p{r}.log") for r in (0, 1)]
    cache = os.environ.get("JAXRLHF_TEST_SESSION_CACHE") or str(tmp_path / "jax_cache")  # tests/conftest.py
    codes = _two(sets, logs, cache, sigterm_when=two_steps_logged)
    text = [_read(p) for p in logs]
    assert codes == [143, 143], f"exit statuses {codes}\n{text[0][-3000:]}\n{text[1][-3000:]}"
    pat = re.compile(
        r"SIGTERM \(preemption\): stopping after step (\d+), saving a checkpoint at step \d+; all 2"
    )
    stops = [pat.findall(t) for t in text]
    assert all(len(s) == 1 for s in stops), stops
    step = int(stops[0][0])
    assert int(stops[1][0]) == step and 2 <= step < 400
    assert all("preempted (SIGTERM)" in t for t in text)
    ck = sorted(int(n) for n in os.listdir(out / "checkpoints") if n.isdigit())
    assert ck == [step]  # checkpoint.every=1000: the preemption's own checkpoint, written by both
    assert not (out / "stage").exists()
    logged = [r["step"] for r in train.read_jsonl(str(metrics)) if "loss" in r]
    assert logged == list(range(1, step + 1))

    again = [str(tmp_path / f"r{r}.log") for r in (0, 1)]
    extended = [s for s in sets if not s.startswith("optim.total_steps=")] + [f"optim.total_steps={step + 2}"]
    codes = _two(extended, again, cache)
    text = [_read(p) for p in again]
    assert codes == [0, 0], f"rerun: {codes}\n{text[0][-3000:]}\n{text[1][-3000:]}"
    for t in text:  # both processes restored the preemption checkpoint
        assert re.search(rf"resumed from \S+ at step {step}\b", t), t[-3000:]
    logged = [r["step"] for r in train.read_jsonl(str(metrics)) if "loss" in r]
    assert logged == list(range(1, step + 3))
    assert train.load_stage(str(out / "stage")).stage_info["step"] == step + 2
    np.testing.assert_array_equal(sorted(int(n) for n in os.listdir(out / "checkpoints") if n.isdigit()),
                                  [step, step + 2])  # fmt: skip
