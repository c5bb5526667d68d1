"""launch/skypilot_{gpu,tpu}.yaml: their structure, and their run blocks under bash with fake SKYPILOT_*."""

from __future__ import annotations

import pytest
import yaml
from _launch_shims import LAUNCH, calls, run, shim_env

from jaxrlhf.distributed import resolve_distributed_env

ARGS = """sft --config configs/tiny/sft.yaml --set 'name=it'"'"'s "q"; $HOME' train.seed=3"""
STAGE = ["sft", "--config", "configs/tiny/sft.yaml", "--set", 'name=it\'s "q"; $HOME', "train.seed=3"]
NODES = {"SKYPILOT_NODE_IPS": "10.1.0.4\n10.1.0.5\n", "SKYPILOT_NUM_NODES": "2"}


def load(name: str) -> dict:
    return yaml.safe_load((LAUNCH / name).read_text())


def run_block(tmp_path, task: dict, **variables: str) -> dict:
    envs = {**{k: str(v) for k, v in task["envs"].items()}, "JAXRLHF_ARGS": ARGS}  # as `sky launch --env`
    env = shim_env(tmp_path, **envs, **variables)
    r = run(["bash", "-c", task["run"]], env)
    assert r.returncode == 0, r.stderr
    (stage,) = calls(env, "python3")
    return stage


def test_structure():
    gpu, tpu = load("skypilot_gpu.yaml"), load("skypilot_tpu.yaml")
    assert gpu["num_nodes"] == 2 and gpu["resources"]["accelerators"] == "H100:8"
    assert tpu["num_nodes"] == 1 and tpu["resources"]["accelerators"] == "tpu-v4-32"
    assert tpu["resources"]["accelerator_args"]["runtime_version"] == "tpu-ubuntu2204-base"
    for task, extra in [(gpu, "gpu"), (tpu, "tpu")]:
        assert set(task) >= {"name", "resources", "num_nodes", "workdir", "envs", "setup", "run"}
        assert task["workdir"] == "."
        assert f"pip install -q -e '.[{extra}]'" in task["setup"]
        assert task["run"].rstrip().endswith('python3 -m jaxrlhf "$@" --distributed')
        assert "JAXRLHF_ARGS" in task["envs"]


@pytest.mark.parametrize("rank", [0, 1])
def test_gpu_run_block_maps_skypilot_onto_jax(tmp_path, rank):
    sky = {**NODES, "SKYPILOT_NODE_RANK": str(rank)}
    stage = run_block(tmp_path, load("skypilot_gpu.yaml"), **sky)
    assert stage["argv"] == ["-m", "jaxrlhf", *STAGE, "--distributed"]
    jax_env = {k: v for k, v in stage["env"].items() if k.startswith("JAX_") and k != "JAX_COORDINATOR_PORT"}
    assert jax_env == {
        "JAX_COORDINATOR_ADDRESS": "10.1.0.4:8476",
        "JAX_NUM_PROCESSES": "2",
        "JAX_PROCESS_ID": str(rank),
    }
    # the same answer as jaxrlhf.distributed's own SkyPilot mapping (used when the YAML exports nothing)
    assert resolve_distributed_env(jax_env) == resolve_distributed_env(sky)


def test_tpu_run_block_leaves_the_cluster_to_jax(tmp_path):
    stage = run_block(tmp_path, load("skypilot_tpu.yaml"), **NODES, SKYPILOT_NODE_RANK="0")
    assert stage["argv"] == ["-m", "jaxrlhf", *STAGE, "--distributed"]
    assert not [k for k in stage["env"] if k.startswith("JAX_")]
    # and on a TPU VM jaxrlhf does not map SKYPILOT_* either: JAX reads the TPU metadata
    assert resolve_distributed_env({**NODES, "SKYPILOT_NODE_RANK": "0"}, tpu_vm=True) is None
