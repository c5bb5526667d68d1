"""Two ``jax.distributed`` processes on localhost (2 CPU devices each) run the stages from the CLI exactly
like one process with 4 devices: SFT (SIGKILLed after a checkpoint, resumed by one process with 4 devices,
then extended by two processes again: the batches do not depend on the process count), the reward model on
its stage checkpoint, and the generations written at the end of SFT.

Each command is what a user types (``jaxrlhf sft --config ... --set ...``) with ``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` set; the test checks equal losses, equal stage parameters (within
float tolerance: the all-reduce order differs), equal samples, every metric step written once, no
temporary directory left behind, and that no process hangs (every command has a timeout).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import chex
import numpy as np
import pytest

from jaxrlhf import train

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SFT = os.path.join(ROOT, "configs", "tiny", "sft.yaml")
RM = os.path.join(ROOT, "configs", "tiny", "rm.yaml")
TIMEOUT = 300

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, rank: int | None = None, port: int | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_") and k != "XLA_FLAGS"}
    env.update(
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""),
    )
    if rank is not None:
        env.update(
            JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(rank)
        )
    return env


def _cmd(stage: str, config: str, sets: list[str]) -> list[str]:
    return [sys.executable, "-m", "jaxrlhf.cli", stage, "--config", config, "--set", *sets]


def _one(stage, config, sets):
    p = subprocess.run(
        _cmd(stage, config, sets), env=_env(4), capture_output=True, text=True, timeout=TIMEOUT
    )
    assert p.returncode == 0, p.stderr[-4000:]


def _two(stage, config, sets, *, kill_when=None):
    """Both processes of a 2-process run; ``kill_when()`` -> True SIGKILLs both (then returns False)."""
    port = _free_port()
    procs = [
        subprocess.Popen(
            _cmd(stage, config, sets),
            env=_env(2, rank, port),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    deadline = time.time() + TIMEOUT
    try:
        while any(p.poll() is None for p in procs):
            if time.time() > deadline:
                raise AssertionError(f"{stage}: a process hung (> {TIMEOUT} s)")
            if kill_when is not None and kill_when():
                for p in procs:
                    p.send_signal(signal.SIGKILL)
                for p in procs:
                    p.wait(30)
                return False
            time.sleep(0.05)
        logs = [p.stdout.read() for p in procs]
        for rank, p in enumerate(procs):
            assert p.returncode == 0, f"process {rank}:\n{logs[rank][-4000:]}"
        return True
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def _steps(run_dir):
    return [r for r in train.read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if "loss" in r]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("multihost")
    shared = [f"tokenizer.cache_dir={base / 'tok'}", f"data.cache_dir={base / 'data'}"]
    sft_sets = shared + [
        "optim.schedule=constant",  # the interrupted run changes total_steps on the way (a safe key)
        "optim.warmup_steps=0",
        "checkpoint.every=4",
        "train.eval_every=12",
        "train.log_every=1",
        "train.progress=false",
        "samples.num=8",
        "samples.sampling.max_new_tokens=8",
    ]
    out = {}
    for kind in ("one", "two"):
        d = base / kind
        sets = sft_sets + [f"output_dir={d / 'sft'}"]
        rm_sets = shared + [
            f"output_dir={d / 'rm'}",
            f"model.path={d / 'sft' / 'stage'}",
            "optim.total_steps=6",
            "checkpoint.every=3",
            "train.eval_every=3",
            "train.log_every=1",
            "train.progress=false",
        ]
        if kind == "one":
            _one("sft", SFT, sets + ["optim.total_steps=28"])
            _one("rm", RM, rm_sets)
        else:
            ckpts = d / "sft" / "checkpoints"

            def after_first_checkpoint(ckpts=ckpts):
                return ckpts.is_dir() and any(n.isdigit() for n in os.listdir(ckpts))

            # 2 processes, SIGKILLed after a checkpoint; resumed by ONE process (4 devices) to step 24; then
            # extended to 28 by two processes again: the data order does not depend on the process count
            finished = _two("sft", SFT, sets + ["optim.total_steps=24"], kill_when=after_first_checkpoint)
            out["killed"] = not finished
            _one("sft", SFT, sets + ["optim.total_steps=24"])
            assert _two("sft", SFT, sets + ["optim.total_steps=28"])
            assert _two("rm", RM, rm_sets)
        out[kind] = d
    return out


def test_sft_two_processes_equal_one(runs):
    assert runs["killed"], "the first 2-process SFT run finished before it could be killed"
    one, two = _steps(runs["one"] / "sft"), _steps(runs["two"] / "sft")
    assert [r["step"] for r in two] == [r["step"] for r in one] == list(range(1, 29))  # each step once
    np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], rtol=2e-5, atol=2e-5)
    a = train.load_stage(runs["one"] / "sft" / "stage")
    b = train.load_stage(runs["two"] / "sft" / "stage")
    assert a.stage_info["step"] == b.stage_info["step"] == 28
    chex.assert_trees_all_close(b.params, a.params, atol=2e-5, rtol=2e-4)
    np.testing.assert_allclose(b.stage_info["eval"]["loss"], a.stage_info["eval"]["loss"], rtol=2e-5)


def test_generation_and_exports_two_processes(runs):
    with open(runs["one"] / "sft" / "samples.jsonl") as f:
        one = [json.loads(line) for line in f]
    with open(runs["two"] / "sft" / "samples.jsonl") as f:
        two = [json.loads(line) for line in f]
    assert len(two) == len(one) == 8
    assert [r["completion"] for r in two] == [r["completion"] for r in one]
    for d in ("one", "two"):
        assert os.path.isfile(runs[d] / "sft" / "export" / "hf" / "model.safetensors")
        leftovers = [n for n in os.listdir(runs[d] / "sft") if ".tmp" in n or ".old-" in n or ".tok-" in n]
        assert leftovers == []


def test_reward_model_two_processes_equal_one(runs):
    one, two = _steps(runs["one"] / "rm"), _steps(runs["two"] / "rm")
    assert [r["step"] for r in two] == [r["step"] for r in one] == list(range(1, 7))
    np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], rtol=2e-5, atol=2e-5)
    a = train.load_stage(runs["one"] / "rm" / "stage", extras=("reward_head",))
    b = train.load_stage(runs["two"] / "rm" / "stage", extras=("reward_head",))
    chex.assert_trees_all_close(b.params, a.params, atol=2e-5, rtol=2e-4)
    chex.assert_trees_all_close(b.extras["reward_head"], a.extras["reward_head"], atol=2e-5, rtol=2e-4)
    for k in ("mean", "std", "accuracy"):
        np.testing.assert_allclose(
            b.extras["reward_stats"][k], a.extras["reward_stats"][k], rtol=1e-4, atol=1e-5
        )
