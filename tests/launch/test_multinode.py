"""launch/multinode.py: --dry-run lines, the per-process variables, real runs (shims, then jaxrlhf)."""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys

import pytest
from _launch_shims import LAUNCH, REPO, calls, run, shim_env

SCRIPT = str(LAUNCH / "multinode.py")
TRICKY = [
    "sft",
    "--config",
    "configs/tiny/sft.yaml",
    "--set",
    'name=it\'s "q"; $HOME `x`',
    "train.log_every=3",
]


def dry_run(*args: str) -> list[tuple[dict[str, str], list[str]]]:
    out = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, check=True).stdout
    rows = []
    for line in out.splitlines():
        words = shlex.split(line)
        n = next(i for i, w in enumerate(words) if "=" not in w or not w.split("=")[0].isidentifier())
        rows.append((dict(w.split("=", 1) for w in words[:n]), words[n:]))
    return rows


def test_dry_run_one_process_per_node():
    rows = dry_run(
        "--nnodes", "4", "--node-rank", "2", "--coordinator", "10.0.0.1:8476", "--dry-run", "--", *TRICKY
    )
    assert rows == [
        (
            {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:8476", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "2"},
            [sys.executable, "-m", "jaxrlhf", *TRICKY, "--distributed"],
        )
    ]


def test_dry_run_one_process_per_gpu():
    head = ["--nnodes=2", "--node-rank=1", "--coordinator=head:1234", "--nproc-per-node=4", "--python=py"]
    rows = dry_run(*head, "--dry-run", "--", *TRICKY, "--distributed")
    assert [env["JAX_PROCESS_ID"] for env, _ in rows] == ["4", "5", "6", "7"]
    assert [env["JAX_LOCAL_DEVICE_IDS"] for env, _ in rows] == ["0", "1", "2", "3"]
    assert {env["JAX_NUM_PROCESSES"] for env, _ in rows} == {"8"}
    assert all(cmd == ["py", "-m", "jaxrlhf", *TRICKY, "--distributed"] for _, cmd in rows)  # not twice
    rows = dry_run("--nnodes=1", "--node-rank=0", "--coordinator=h:1", "--nproc-per-node=2",
                   "--local-device-ids=4,5,6,7", "--dry-run", "--", "rm")  # fmt: skip
    assert [env["JAX_LOCAL_DEVICE_IDS"] for env, _ in rows] == ["4,5", "6,7"]
    head = ["--nnodes=1", "--node-rank=0", "--coordinator=h:1", "--local-device-ids=2,3"]
    ((env, _),) = dry_run(*head, "--dry-run", "--", "rm")
    assert env["JAX_LOCAL_DEVICE_IDS"] == "2,3"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--nnodes=2", "--node-rank=2", "--coordinator=h:1", "--", "sft"], "--node-rank 2 is not in 0..1"),
        (["--nnodes=1", "--node-rank=0", "--coordinator=h", "--", "sft"], "'h' is not host:port"),
        (
            [
                "--nnodes=1",
                "--node-rank=0",
                "--coordinator=h:1",
                "--nproc-per-node=2",
                "--local-device-ids=0,1,2",
                "--",
                "sft",
            ],
            "3 ids for 2 processes",
        ),  # fmt: skip
        (
            ["--nnodes=1", "--node-rank=0", "--coordinator=h:1", "--local-device-ids=0,a", "--", "sft"],
            "device ids",
        ),
        (["--nnodes=1", "--node-rank=0", "--coordinator=h:1"], "give the jaxrlhf command after --"),
        (["--nnodes=1", "--node-rank=0", "--coordinator=h:1", "--", "generate"], "runs on one host"),
    ],
)
def test_bad_arguments(args, message):
    r = subprocess.run([sys.executable, SCRIPT, *args, "--dry-run"], capture_output=True, text=True)
    assert r.returncode == 2 and message in r.stderr, r.stderr


def test_help():
    r = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "JAX_LOCAL_DEVICE_IDS" in r.stdout and "--nproc-per-node" in r.stdout


@pytest.mark.parametrize("nproc, exit_code", [(1, 0), (1, 3), (3, 0), (3, 5)])
def test_runs_each_process_with_its_variables(tmp_path, nproc, exit_code):
    env = shim_env(tmp_path, SHIM_EXIT=str(exit_code))
    argv = [
        sys.executable,
        SCRIPT,
        "--nnodes=2",
        "--node-rank=1",
        "--coordinator=h:9",
        f"--nproc-per-node={nproc}",
    ]
    r = run([*argv, "--python=python3", "--", *TRICKY], env)
    assert r.returncode == exit_code, r.stderr
    seen = calls(env, "python3")
    ids = [str(nproc + k) for k in range(nproc)]
    assert sorted(c["env"]["JAX_PROCESS_ID"] for c in seen) == ids
    assert all(c["argv"] == ["-m", "jaxrlhf", *TRICKY, "--distributed"] for c in seen)
    assert all(c["env"]["JAX_NUM_PROCESSES"] == str(2 * nproc) for c in seen)
    assert all(("JAX_LOCAL_DEVICE_IDS" in c["env"]) == (nproc > 1) for c in seen)


def test_two_real_jaxrlhf_processes(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    keep = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TMPDIR") if k in os.environ}
    env = {
        **keep,
        "PYTHONPATH": str(REPO),
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
    }
    argv = [sys.executable, SCRIPT, "--nnodes=1", "--node-rank=0", f"--coordinator=127.0.0.1:{port}"]
    r = run([*argv, "--nproc-per-node=2", "--", *TRICKY, "--print-config"], env, cwd=REPO)
    assert r.returncode == 0, r.stderr
    for k in range(2):
        assert f"jax.distributed (JAX_* variables): process {k} of 2, 2 local / 4 global devices" in r.stderr
    assert (
        r.stdout.count('name: it\'s "q"; $HOME `x`') == 2
    )  # both printed the config with the value verbatim
