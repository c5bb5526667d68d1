"""jaxrlhf.distributed: environment -> jax.distributed.initialize arguments, the mesh summary, and a real
two-process start-up on localhost (the test process itself never initialises jax.distributed)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jaxrlhf import distributed
from jaxrlhf.distributed import DistributedEnvError, resolve_distributed_env

REPO = Path(__file__).resolve().parents[1]
SLURM = {
    "SLURM_JOB_ID": "4242",
    "SLURM_STEP_NODELIST": "gpu[01-02]",
    "SLURM_NTASKS": "2",
    "SLURM_PROCID": "1",
    "SLURM_LOCALID": "0",
}


def test_nothing_set_means_no_arguments():
    assert resolve_distributed_env({}) is None
    assert resolve_distributed_env({"PATH": "/usr/bin", "HOME": "/root"}) is None
    assert resolve_distributed_env(SLURM) is None  # JAX's own Slurm detection decides
    assert distributed._resolve(SLURM, tpu_vm=False)[1] == "detected by JAX (slurm)"


def test_jax_variables():
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert resolve_distributed_env(env) == dict(
        coordinator_address="10.0.0.2:1234", num_processes=4, process_id=3
    )
    env["JAX_LOCAL_DEVICE_IDS"] = "0, 2,3"
    assert resolve_distributed_env(env)["local_device_ids"] == [0, 2, 3]
    ipv6 = {"JAX_COORDINATOR_ADDRESS": "[fd00::2]:99", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}
    assert resolve_distributed_env(ipv6)["coordinator_address"] == "[fd00::2]:99"


def test_explicit_values_switch_off_slurm_detection():
    # one task per node: JAX's Slurm detection would pin local_device_ids=[SLURM_LOCALID] (one GPU of 8)
    env = {**SLURM, "JAX_COORDINATOR_ADDRESS": "gpu01:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    assert resolve_distributed_env(env) == dict(
        coordinator_address="gpu01:1234", num_processes=2, process_id=1, cluster_detection_method="deactivate"
    )
    # local ids given: they are what JAX uses, detection may fill nothing else
    assert "cluster_detection_method" not in resolve_distributed_env({**env, "JAX_LOCAL_DEVICE_IDS": "0,1"})
    # inside a detected cluster a partial set is completed by JAX
    assert resolve_distributed_env({**SLURM, "JAX_NUM_PROCESSES": "2"}) == {"num_processes": 2}
    assert resolve_distributed_env({"JAX_PROCESS_ID": "1"}, tpu_vm=True) == {"process_id": 1}
    assert resolve_distributed_env({**SLURM, "JAX_LOCAL_DEVICE_IDS": "3"}) == {"local_device_ids": [3]}


@pytest.mark.parametrize(
    "env, message",
    [
        (
            {"JAX_COORDINATOR_ADDRESS": "10.0.0.2", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"},
            "has no port",
        ),
        (
            {"JAX_COORDINATOR_ADDRESS": ":1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"},
            "has no port",
        ),
        ({"JAX_COORDINATOR_ADDRESS": "fd00::2:99", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "IPv6"),
        (
            {"JAX_COORDINATOR_ADDRESS": "h:http", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"},
            "port 'http'",
        ),
        ({"JAX_COORDINATOR_ADDRESS": "h:70000", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "1..65535"),
        (
            {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "one"},
            "JAX_PROCESS_ID=",
        ),
        ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}, "from 0 to 1"),
        ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "0", "JAX_PROCESS_ID": "0"}, "must be >= 1"),
        (
            {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "-1"},
            "must be >= 0",
        ),
        ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "JAX_COORDINATOR_ADDRESS not set"),
        ({"JAX_COORDINATOR_ADDRESS": "h:1"}, "JAX_NUM_PROCESSES, JAX_PROCESS_ID not set"),
        ({"JAX_LOCAL_DEVICE_IDS": "0,1"}, "nothing names the coordinator"),
        ({**SLURM, "JAX_LOCAL_DEVICE_IDS": "0,x"}, "comma-separated device ids"),
        ({**SLURM, "JAX_LOCAL_DEVICE_IDS": "0,0"}, "distinct"),
        (
            {"JAX_COORDINATOR_PORT": "8476x", "SKYPILOT_NODE_IPS": "a", "SKYPILOT_NODE_RANK": "0"},
            "COORDINATOR_PORT",
        ),
    ],
)
def test_bad_environments_name_the_variable(env, message):
    with pytest.raises(DistributedEnvError, match=message.replace("(", r"\(").replace(".", r"\.")):
        resolve_distributed_env(env)


def test_skypilot():
    env = {"SKYPILOT_NODE_RANK": "1", "SKYPILOT_NODE_IPS": "10.1.0.4\n10.1.0.5\n", "SKYPILOT_NUM_NODES": "2"}
    assert resolve_distributed_env(env) == dict(
        coordinator_address="10.1.0.4:8476", num_processes=2, process_id=1
    )
    assert (
        resolve_distributed_env({**env, "JAX_COORDINATOR_PORT": "9000"})["coordinator_address"]
        == "10.1.0.4:9000"
    )
    no_count = {k: v for k, v in env.items() if k != "SKYPILOT_NUM_NODES"}
    assert resolve_distributed_env(no_count)["num_processes"] == 2
    # a TPU pod slice is ONE SkyPilot node of several hosts: the TPU metadata decides
    assert resolve_distributed_env(env, tpu_vm=True) is None
    # JAX_* variables win over SkyPilot's
    jax_env = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert resolve_distributed_env({**env, **jax_env})["num_processes"] == 4
    with pytest.raises(DistributedEnvError, match="SKYPILOT_NUM_NODES=3 but SKYPILOT_NODE_IPS lists 2"):
        resolve_distributed_env({**env, "SKYPILOT_NUM_NODES": "3"})
    with pytest.raises(DistributedEnvError, match="SKYPILOT_NODE_RANK=2 but SKYPILOT_NUM_NODES=2"):
        resolve_distributed_env({**env, "SKYPILOT_NODE_RANK": "2"})


def test_torchrun_style():
    per_node = {"MASTER_ADDR": "head", "MASTER_PORT": "29500", "NNODES": "3", "NODE_RANK": "2"}
    assert resolve_distributed_env(per_node) == dict(
        coordinator_address="head:29500", num_processes=3, process_id=2
    )
    # Kubeflow PyTorchJob style: one process per pod
    pod = {"MASTER_ADDR": "job-master-0", "MASTER_PORT": "23456", "WORLD_SIZE": "4", "RANK": "0"}
    assert resolve_distributed_env(pod) == dict(
        coordinator_address="job-master-0:23456", num_processes=4, process_id=0
    )
    # torchrun itself, 8 processes per node: its agent holds MASTER_PORT; each process drives LOCAL_RANK
    torchrun = {**pod, "WORLD_SIZE": "16", "RANK": "13", "LOCAL_RANK": "5", "LOCAL_WORLD_SIZE": "8"}
    torchrun["TORCHELASTIC_RUN_ID"] = "none"
    assert resolve_distributed_env(torchrun) == dict(
        coordinator_address="job-master-0:23457", num_processes=16, process_id=13, local_device_ids=[5]
    )
    one_per_node = {**torchrun, "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "WORLD_SIZE": "2", "RANK": "1"}
    assert "local_device_ids" not in resolve_distributed_env(one_per_node)
    assert resolve_distributed_env({**torchrun, "JAX_LOCAL_DEVICE_IDS": "1,2"})["local_device_ids"] == [1, 2]
    assert (
        resolve_distributed_env({**pod, "MASTER_ADDR": "fd00::1"})["coordinator_address"] == "[fd00::1]:23456"
    )
    for env, message in [
        ({"MASTER_ADDR": "head", "NNODES": "2", "NODE_RANK": "0"}, "MASTER_PORT is not"),
        ({"MASTER_ADDR": "head", "MASTER_PORT": "1"}, "neither WORLD_SIZE"),
        ({"MASTER_ADDR": "head", "MASTER_PORT": "1", "WORLD_SIZE": "2"}, "but RANK is not"),
        ({**per_node, "NODE_RANK": "3"}, "NODE_RANK=3 but NNODES=3"),
        ({**torchrun, "LOCAL_RANK": ""}, "LOCAL_RANK is not set"),
    ]:
        with pytest.raises(DistributedEnvError, match=message):
            resolve_distributed_env(env)


@given(n=st.integers(1, 4096), data=st.data())
def test_every_source_gives_a_rank_below_the_count(n, data):
    rank = data.draw(st.integers(0, n - 1))
    ips = "\n".join(f"10.0.{i // 256}.{i % 256}" for i in range(n))
    for env in [
        {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": str(n), "JAX_PROCESS_ID": str(rank)},
        {"SKYPILOT_NODE_IPS": ips, "SKYPILOT_NODE_RANK": str(rank), "SKYPILOT_NUM_NODES": str(n)},
        {"MASTER_ADDR": "h", "MASTER_PORT": "1", "WORLD_SIZE": str(n), "RANK": str(rank)},
    ]:
        kwargs = resolve_distributed_env(env)
        assert (kwargs["num_processes"], kwargs["process_id"]) == (n, rank)
        distributed.check_address(kwargs["coordinator_address"], "x")
        with pytest.raises(DistributedEnvError):
            bad = {
                k: (str(n + data.draw(st.integers(0, 3))) if v == str(rank) else v) for k, v in env.items()
            }
            resolve_distributed_env(bad)


def test_wants_distributed():
    assert not distributed.wants_distributed(False, {})
    assert not distributed.wants_distributed(False, {"JAXRLHF_DISTRIBUTED": "0", "SKYPILOT_NODE_RANK": "0"})
    assert distributed.wants_distributed(True, {})
    assert distributed.wants_distributed(False, {"JAXRLHF_DISTRIBUTED": "Yes"})
    assert distributed.wants_distributed(False, {"JAX_COORDINATOR_ADDRESS": "h:1"})
    with pytest.raises(DistributedEnvError, match="JAXRLHF_DISTRIBUTED='2'"):
        distributed.wants_distributed(False, {"JAXRLHF_DISTRIBUTED": "2"})


def test_initialize_passes_the_resolved_arguments(monkeypatch):
    import jax

    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    assert not distributed.initialize({})  # nothing asks for it
    assert distributed.initialize({}, force=True)  # --distributed: JAX detects
    env = {"SKYPILOT_NODE_RANK": "0", "SKYPILOT_NODE_IPS": "10.1.0.4", "JAXRLHF_DISTRIBUTED": "1"}
    assert distributed.initialize(env)
    assert calls == [{}, dict(coordinator_address="10.1.0.4:8476", num_processes=1, process_id=0)]
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    assert distributed.initialize(env) and len(calls) == 2  # a second call is a no-op


def test_cli_turns_a_bad_environment_into_a_message(monkeypatch):
    from jaxrlhf import cli

    with pytest.raises(SystemExit, match="jaxrlhf: JAX_PROCESS_ID=5 but JAX_NUM_PROCESSES=2"):
        cli.init_distributed(
            {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "5"}
        )
    with pytest.raises(SystemExit, match="JAXRLHF_DISTRIBUTED"):
        cli.wants_distributed(False, {"JAXRLHF_DISTRIBUTED": "maybe"})


def _fake_mesh(shape, names, process_of):
    devices = np.empty(int(np.prod(shape)), dtype=object)
    for i in range(devices.size):
        devices[i] = types.SimpleNamespace(id=i, process_index=process_of(i), platform="tpu")
    return types.SimpleNamespace(devices=devices.reshape(shape), axis_names=names)


def test_describe_mesh():
    text = distributed.describe_mesh(_fake_mesh((2, 4, 2), ("data", "fsdp", "tensor"), lambda i: i // 8))
    assert text.splitlines() == [
        "mesh data=2 fsdp=4 tensor=2: 16 tpu devices, 2 processes x 8",
        "  process 0: devices 0-7; data 0, fsdp 0-3, tensor 0-1",
        "  process 1: devices 8-15; data 1, fsdp 0-3, tensor 0-1",
    ]
    # hosts interleaved along fsdp, many processes elided
    many = distributed.describe_mesh(_fake_mesh((1, 64, 1), ("data", "fsdp", "tensor"), lambda i: i % 16))
    lines = many.splitlines()
    assert lines[0] == "mesh data=1 fsdp=64 tensor=1: 64 tpu devices, 16 processes x 4"
    assert lines[1] == "  process 0: devices 0,16,32,48; fsdp 0,16,32,48"
    assert lines[7] == "  ... (9 more processes)" and lines[8].startswith("  process 15: devices 15,31,47,63")
    assert len(lines) == 9


def test_describe_mesh_of_a_real_mesh():
    from jaxrlhf import sharding

    text = distributed.describe_mesh(sharding.make_mesh(data=2, fsdp=4))
    assert text.splitlines()[0] == "mesh data=2 fsdp=4 tensor=1: 8 cpu devices, 1 process x 8"
    assert text.splitlines()[1] == "  process 0: devices 0-7; data 0-1, fsdp 0-3"


WORKER = """
import logging, sys
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stdout)
from jaxrlhf import distributed
assert distributed.initialize()  # from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
import jax
import numpy as np
from jax.experimental import multihost_utils
from jaxrlhf import sharding
assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2
gathered = multihost_utils.process_allgather(np.array([10 * jax.process_index() + 1]))
assert gathered.tolist() == [[1], [11]], gathered
print(distributed.describe_mesh(sharding.make_mesh(data=2, fsdp=2)))
print("worker", jax.process_index(), "ok")
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_on_localhost(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER))
    port = _free_port()
    keep = ("PATH", "HOME", "LANG", "TMPDIR", "VIRTUAL_ENV")
    base = {k: os.environ[k] for k in keep if k in os.environ}
    base.update(
        PYTHONPATH=str(REPO),
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
        JAX_NUM_PROCESSES="2",
    )
    procs = [
        subprocess.Popen(
            [sys.executable, str(script)],
            env={**base, "JAX_PROCESS_ID": str(i)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=120)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, (p, out) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 0, f"worker {i} exited {p.returncode}:\n{out}"
        assert f"worker {i} ok" in out
        assert f"jax.distributed (JAX_* variables): process {i} of 2, 2 local / 4 global devices" in out
        assert "  process 0: devices 0-1; data 0, fsdp 0-1" in out
        assert "; data 1, fsdp 0-1" in out  # process 1's devices (CPU ids of process 1 start at 2048)
