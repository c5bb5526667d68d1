"""launch/slurm.sbatch under bash with fake SLURM_* variables and fake scontrol / srun on PATH."""

from __future__ import annotations

import shlex
import shutil
import subprocess

import pytest
from _launch_shims import LAUNCH, calls, run, shim_env

from jaxrlhf.distributed import resolve_distributed_env

SCRIPT = str(LAUNCH / "slurm.sbatch")
STAGE = ["sft", "--config", "configs/tiny/sft.yaml", "--set", 'name=it\'s "q"; $HOME `x`']
JOB = {"SLURM_JOB_ID": "1234", "SLURM_JOB_NODELIST": "gpu-a[01-02]", "SLURM_STEP_NODELIST": "gpu-a[01-02]",
       "SLURM_NTASKS": "2", "SHIM_HOSTS": "gpu-a01,gpu-a02"}  # fmt: skip


def test_sbatch_header_asks_for_one_task_per_node():
    lines = (LAUNCH / "slurm.sbatch").read_text().splitlines()
    header = [line for line in lines if line.startswith("#SBATCH")]
    assert "#SBATCH --ntasks-per-node=1" in header and "#SBATCH --gpus-per-node=8" in header
    first_command = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
    assert all(lines.index(h) < first_command for h in header)  # sbatch stops reading at the first command


@pytest.mark.parametrize("exit_code", [0, 4])
def test_every_task_gets_its_variables(tmp_path, exit_code):
    env = shim_env(tmp_path, **JOB, SHIM_EXIT=str(exit_code))
    r = run(["bash", SCRIPT, *STAGE], env)
    assert r.returncode == exit_code, r.stderr
    assert calls(env, "scontrol")[0]["argv"] == ["show", "hostnames", "gpu-a[01-02]"]
    (srun,) = calls(env, "srun")
    assert srun["argv"][:2] == ["--ntasks=2", "--kill-on-bad-exit=1"]
    tasks = calls(env, "python3")
    port = str(61440 + 1234 % 4096)  # the port JAX's own Slurm detection would pick
    assert [t["env"]["JAX_PROCESS_ID"] for t in tasks] == ["0", "1"]
    for t in tasks:
        assert t["argv"] == ["-m", "jaxrlhf", *STAGE, "--distributed"]
        assert (
            t["env"]["JAX_COORDINATOR_ADDRESS"] == f"gpu-a01:{port}" and t["env"]["JAX_NUM_PROCESSES"] == "2"
        )
        # what jaxrlhf then asks of JAX: these values, and no Slurm detection (which would pin one GPU)
        kwargs = resolve_distributed_env(t["env"])
        rank = int(t["env"]["SLURM_PROCID"])
        expected = dict(coordinator_address=f"gpu-a01:{port}", num_processes=2, process_id=rank)
        assert kwargs == {**expected, "cluster_detection_method": "deactivate"}


def test_port_override_python_and_dry_run(tmp_path):
    env = shim_env(tmp_path, **JOB, JAX_COORDINATOR_PORT="7777", JAXRLHF_PYTHON="python3")
    r = run(["bash", SCRIPT, "--dry-run", *STAGE, "--distributed"], env)
    assert r.returncode == 0, r.stderr
    assert calls(env, "srun") == [] and calls(env, "python3") == []  # nothing ran
    lines = r.stdout.splitlines()
    assert lines[:2] == ["export JAX_COORDINATOR_ADDRESS=gpu-a01:7777", "export JAX_NUM_PROCESSES=2"]
    srun = shlex.split(lines[2])
    assert srun[:3] == ["srun", "--ntasks=2", "--kill-on-bad-exit=1"]
    assert srun[srun.index("jaxrlhf-task") + 1 :] == ["python3", "-m", "jaxrlhf", *STAGE, "--distributed"]


def test_usage(tmp_path):
    env = shim_env(tmp_path, **JOB)
    r = run(["bash", SCRIPT], env)
    assert r.returncode == 2 and "sbatch --nodes=4 launch/slurm.sbatch" in r.stderr
    r = run(["bash", SCRIPT, "--help"], env)
    assert r.returncode == 0 and "JAX_PROCESS_ID" in r.stdout and "#SBATCH --" not in r.stdout
    r = run(["bash", SCRIPT, "sft"], {k: v for k, v in env.items() if k != "SLURM_JOB_NODELIST"})
    assert r.returncode != 0 and "submit this script with sbatch" in r.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck():
    subprocess.run(["shellcheck", SCRIPT, str(LAUNCH / "tpu_pod.sh")], check=True)
