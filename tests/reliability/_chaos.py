"""Fault injection for whole CLI runs: start ``python -m jaxrlhf.cli <stage> --config ... --set ...`` as a
subprocess, SIGKILL it at a chosen moment, and read back what it left on disk.

A kill is described by a :class:`Kill`: ``when`` is one of

- ``"step"``: as soon as this run has written a train record of step >= ``at`` to ``metrics.jsonl`` (a
  random step, drawn by the caller from a seeded generator; a run resumed past it is killed after its first
  step), then after ``delay`` seconds more (also drawn);
- ``"checkpoint_tmp"``: the moment a ``checkpoints/<n>.orbax-checkpoint-tmp*`` directory exists (an async
  train-checkpoint write in flight);
- ``"stage_tmp"``: the moment ``stage.tmp`` exists (the stage checkpoint being written);
- ``"sigterm"``: like ``"step"``, but the process gets SIGTERM (preemption) instead of SIGKILL and is left
  to save its checkpoint and exit on its own (exit status 143).

``sub`` names the stage run inside the run directory whose checkpoints the kill watches (a pipeline's
``sft``, ``rm``, ...; "" = the run directory itself).

The watcher polls every ~2 ms. Partial directories left by an earlier kill do not trigger a kill: only a
new one does. After the kill it records whether the partial directory was still there (the kill really
landed mid-write) and which train checkpoints were complete, so the test can check that the
restart resumed from the newest complete one and never from the partial one.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT = 240


@dataclasses.dataclass
class Kill:
    when: str  # "step" | "checkpoint_tmp" | "stage_tmp" | "sigterm"
    at: int = 0  # step for when="step" / "sigterm"
    delay: float = 0.0
    sub: str = ""  # the stage run (a pipeline's sub-directory) the trigger and checkpoints refer to


@dataclasses.dataclass
class Outcome:
    killed: bool  # False: the run ended before the trigger
    returncode: int
    log: str
    partial_seen: list[str]  # partial directories made by this run, present right after the kill
    complete_steps: list[int]  # train checkpoints complete right after the kill


def command(stage: str, config: str, sets: list[str]) -> list[str]:
    return [sys.executable, "-m", "jaxrlhf.cli", stage, "--config", config, "--set", *sets]


def env(cache_dir: str) -> dict:
    e = dict(os.environ)  # tests/conftest.py: 8 fake CPU devices, offline hub
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    e["JAXRLHF_COMPILATION_CACHE"] = cache_dir  # restarts load their compiled steps (as users' runs do)
    # every program, not only those compiling in >= 1 s: the tiny models' many small programs are most of
    # a restart's compile time (an SFT row's restart: ~12 s -> ~10 s)
    e["JAXRLHF_COMPILATION_CACHE_MIN_SECS"] = "0"
    return e


def resumed_step(log: str, run_dir: str) -> int | None:
    """N of the log's "resumed from <run_dir>/checkpoints at step N" (None: that run did not resume)."""
    where = re.escape(os.path.join(run_dir, "checkpoints"))
    m = re.search(rf"resumed from {where}/? at step (\d+)", log)
    return int(m.group(1)) if m else None


def complete_steps(run_dir: str) -> list[int]:
    ck = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(ck):
        return []
    return sorted(int(n) for n in os.listdir(ck) if n.isdigit())


def partial_dirs(run_dir: str) -> list[str]:
    found = []
    ck = os.path.join(run_dir, "checkpoints")
    if os.path.isdir(ck):
        found += [os.path.join("checkpoints", n) for n in os.listdir(ck) if "tmp" in n]
    if os.path.isdir(os.path.join(run_dir, "stage.tmp")):
        found.append("stage.tmp")
    return found


def new_partials(run_dir: str, old: dict) -> list[str]:
    """Partial directories present now that were not there before this run started (see :func:`run`)."""
    found = [p for p in partial_dirs(run_dir) if p != "stage.tmp" and os.path.basename(p) not in old["ckpt"]]
    ino = _stage_tmp_id(run_dir)
    return found + (["stage.tmp"] if ino is not None and ino != old["stage"] else [])


def _lines(path: str) -> list[str]:
    try:
        with open(path) as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


def _last_new_step(metrics: str, old_lines: set[str]) -> int:
    """The highest step of a train record written by this run (records of earlier runs are in
    ``old_lines``; a resumed run rewrites the ones it keeps, then appends records with fresh timings)."""
    step = 0
    for line in _lines(metrics):
        m = re.match(r'\{"step": (\d+), ', line)
        if m and '"loss"' in line and line not in old_lines:
            step = max(step, int(m.group(1)))
    return step


def _stage_tmp_id(run_dir: str) -> int | None:
    try:
        return os.stat(os.path.join(run_dir, "stage.tmp")).st_ino
    except FileNotFoundError:
        return None


def _triggered(kill: Kill, run_dir: str, since: list[float], old: dict) -> bool:
    """Whether ``kill`` fires now; partial directories left by an earlier kill (``old``) do not count."""
    run_dir = os.path.join(run_dir, kill.sub)
    if kill.when in ("step", "sigterm"):
        if not since and _last_new_step(os.path.join(run_dir, "metrics.jsonl"), old["metrics"]) >= kill.at:
            since.append(time.monotonic())
        return bool(since) and time.monotonic() - since[0] >= kill.delay
    if kill.when == "checkpoint_tmp":
        ck = os.path.join(run_dir, "checkpoints")
        try:
            return any("orbax-checkpoint-tmp" in n and n not in old["ckpt"] for n in os.listdir(ck))
        except FileNotFoundError:
            return False
    if kill.when == "stage_tmp":  # save_stage removes a leftover stage.tmp and makes a new one
        ino = _stage_tmp_id(run_dir)
        return ino is not None and ino != old["stage"]
    raise ValueError(kill.when)


def run(cmd: list[str], run_dir: str, log_path: str, cache_dir: str, kill: Kill | None = None) -> Outcome:
    """Run ``cmd`` (its outputs under ``run_dir``), SIGKILLed (or sent SIGTERM) when ``kill`` triggers;
    the outcome's partial / complete checkpoints are those of the stage run ``kill.sub``."""
    where = os.path.join(run_dir, kill.sub) if kill is not None else run_dir
    ck = os.path.join(where, "checkpoints")
    old = {
        "ckpt": set(os.listdir(ck)) if os.path.isdir(ck) else set(),
        "stage": _stage_tmp_id(where),
        "metrics": set(_lines(os.path.join(where, "metrics.jsonl"))),
    }
    with open(log_path, "w") as log:
        p = subprocess.Popen(cmd, env=env(cache_dir), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        deadline, since, killed = time.monotonic() + TIMEOUT, [], False
        partial, complete = [], []
        try:
            while p.poll() is None:
                if time.monotonic() > deadline:
                    raise AssertionError(f"{' '.join(cmd)} hung (> {TIMEOUT} s); log: {log_path}")
                if kill is not None and _triggered(kill, run_dir, since, old):
                    if kill.when == "sigterm":  # preemption: the run saves and exits by itself
                        p.send_signal(signal.SIGTERM)
                        p.wait(TIMEOUT)
                    else:
                        p.send_signal(signal.SIGKILL)
                        p.wait(30)
                    killed = True
                    partial, complete = new_partials(where, old), complete_steps(where)
                    break
                time.sleep(0.002)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait(30)
    with open(log_path) as f:
        text = f.read()
    return Outcome(killed, p.returncode, text, partial, complete)
