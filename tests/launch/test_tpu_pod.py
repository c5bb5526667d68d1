"""launch/tpu_pod.py (and the tpu_pod.sh wrapper): the --dry-run commands, their quoting, and a whole launch
against a fake gcloud whose one "worker" is this machine (ssh runs the command in a temporary home)."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from _launch_shims import LAUNCH, calls, run, shim_env

SCRIPT = str(LAUNCH / "tpu_pod.py")
STAGE = ["sft", "--config", "configs/tiny/sft.yaml", "--set", 'name=it\'s "q"; rm -rf / $(x)', "train.seed=3"]


def dry_run(*args: str, launcher: list[str] | None = None) -> list[list[str]]:
    argv = launcher or [sys.executable, SCRIPT]
    out = subprocess.run([*argv, "--dry-run", *args], capture_output=True, text=True, check=True).stdout
    return [shlex.split(line) for line in out.splitlines() if not line.startswith("#")]


def command_of(argv: list[str]) -> str:
    (cmd,) = [a[len("--command=") :] for a in argv if a.startswith("--command=")]
    return cmd


def test_dry_run_commands():
    lines = dry_run(
        "my-v4", "us-central2-b", "--project=proj", "--accelerator-type=v4-32", "--spot", "--install=copy",
        "--job-name=j1", "--copy-back=runs/x", "--to=out", "--delete", "--env=FORWARD_A=a b", "--", *STAGE,
    )  # fmt: skip
    tpu = ["gcloud", "compute", "tpus", "tpu-vm"]
    scope = ["--zone=us-central2-b", "--project=proj"]
    assert lines[0] == [*tpu, "describe", "my-v4", *scope, "--format=value(state)"]
    assert lines[1] == [*tpu, "create", "my-v4", *scope, "--accelerator-type=v4-32",
                        "--version=tpu-ubuntu2204-base", "--spot"]  # fmt: skip
    assert lines[2][:3] == ["git", "-C", str(LAUNCH.parent)] and lines[2][-1] == "HEAD"
    assert lines[3] == [
        *tpu,
        "scp",
        "/tmp/jaxrlhf-j1.tar.gz",
        "my-v4:jaxrlhf-src.tar.gz",
        *scope,
        "--worker=all",
    ]
    assert lines[4][:6] == [*tpu, "ssh", "my-v4"] and "--worker=all" in lines[4]
    assert "pip install --user -q -e './jaxrlhf[tpu]'" in command_of(lines[4])
    start, stream = lines[5], lines[6]
    assert "--worker=all" in start and "--worker=0" in stream
    sources = ["my-v4:jaxrlhf/runs/x", "my-v4:jaxrlhf/.launch/j1.log"]
    assert lines[7] == [*tpu, "scp", "--recurse", *sources, "out", *scope, "--worker=0"]
    assert lines[8] == [*tpu, "delete", "my-v4", *scope, "--quiet"]
    assert len(lines) == 9
    # the stage command survives the three levels of quoting: ssh --command, bash -c, the command itself
    remote = shlex.split(command_of(start))
    body = shlex.split(remote[remote.index("-c") + 1])
    tail = ["--distributed;", "echo", "$?", ">", ".launch/j1.rc"]
    assert body[body.index("python3") :] == ["python3", "-m", "jaxrlhf", *STAGE, *tail]
    assert body[:2] == ["export", "FORWARD_A=a b;"]


def test_defaults_and_install_variants():
    (describe, start, stream) = dry_run("t", "z", "--job-name=j", "--", "rm", "--distributed")
    assert "--project" not in " ".join(describe) and "create" not in describe
    assert command_of(start).count("--distributed") == 1
    git = dry_run("t", "z", "--install=git", "--git-url=https://example.org/jaxrlhf@v1", "--", "sft")[1]
    assert "pip install --user -q 'jaxrlhf[tpu] @ git+https://example.org/jaxrlhf@v1'" in command_of(git)
    scp, install = dry_run(
        "t", "z", "--install=wheel", "--wheel=dist/jaxrlhf-0.1-py3-none-any.whl", "--", "sft"
    )[1:3]
    assert scp[5:7] == ["dist/jaxrlhf-0.1-py3-none-any.whl", "t:jaxrlhf-0.1-py3-none-any.whl"]
    assert "'./jaxrlhf-0.1-py3-none-any.whl[tpu]'" in command_of(install)
    v5p = dry_run("t", "z", "--accelerator-type=v5p-64", "--", "sft")[1]
    assert "--version=v2-alpha-tpuv5" in v5p and "--spot" not in v5p


def test_secrets_are_not_printed(monkeypatch):
    monkeypatch.setenv("FORWARD_TOKEN", "s3cr3t")
    out = subprocess.run([sys.executable, SCRIPT, "t", "z", "--env=FORWARD_TOKEN", "--dry-run", "--", "sft"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert "s3cr3t" not in out and "<FORWARD_TOKEN from local environment>" in out


def test_wrapper_keeps_the_old_form():
    old = dry_run(
        "t", "z", "--setup", "--job-name=j", "--", *STAGE, launcher=["bash", str(LAUNCH / "tpu_pod.sh")]
    )
    new = dry_run("t", "z", "--install=copy", "--job-name=j", "--", *STAGE)
    assert old == new


@pytest.mark.parametrize(
    "args, message",
    [
        (["t", "z"], "give the jaxrlhf command after --"),
        (["t", "z", "--", "generate", "--prompt", "x"], "runs on one host"),
        (["t", "z", "--install=git", "--", "sft"], "--install git needs --git-url"),
        (["t", "z", "--install=wheel", "--", "sft"], "--install wheel needs --wheel"),
        (["t", "z", "--accelerator-type=v9x-8", "--", "sft"], "pass --runtime-version"),
        (["t", "z", "--env=NOT_SET_ANYWHERE_42", "--", "sft"], "not set in the local environment"),
    ],
)
def test_bad_arguments(args, message):
    r = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True)
    assert r.returncode == 2 and message in r.stderr, r.stderr


def test_help():
    r = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--worker=all" in r.stdout and "--accelerator-type" in r.stdout


@pytest.mark.parametrize("exit_code", [0, 3])
def test_whole_launch_against_a_fake_gcloud(tmp_path, exit_code):
    home = tmp_path / "worker"
    home.mkdir()
    env = shim_env(tmp_path, FAKE_TPU_HOME=str(home), SHIM_EXIT=str(exit_code), FORWARD_TOKEN="s3 'cr' $et")
    run_dir = home / "jaxrlhf" / "runs" / "x"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("{}\n")
    job = f"t{exit_code}-{tmp_path.name}"  # unique: the local tarball is /tmp/jaxrlhf-JOB.tar.gz
    args = ["my-tpu", "zone-a", "--accelerator-type=v4-8", "--install=copy", f"--job-name={job}",
            "--env=FORWARD_TOKEN", "--copy-back=runs/x", f"--to={tmp_path}", "--delete"]  # fmt: skip
    r = run([sys.executable, SCRIPT, *args, "--", *STAGE], env)
    assert r.returncode == exit_code, r.stderr
    verbs = [c["argv"][3] for c in calls(env, "gcloud")]
    assert verbs == ["describe", "create", "scp", "ssh", "ssh", "ssh", "scp", "delete"]
    # the repository arrived and was installed; the stage ran with its arguments and the forwarded secret
    assert (home / "jaxrlhf" / "pyproject.toml").exists() and (
        home / "jaxrlhf" / "jaxrlhf" / "cli.py"
    ).exists()
    pip, stage = calls(env, "python3")
    assert pip["argv"] == ["-m", "pip", "install", "--user", "-q", "-e", "./jaxrlhf[tpu]"]
    assert stage["argv"] == ["-m", "jaxrlhf", *STAGE, "--distributed"]
    assert stage["env"]["FORWARD_TOKEN"] == "s3 'cr' $et" and stage["cwd"] == str(home / "jaxrlhf")
    # worker 0's log was streamed to us, and copied back with the run directory
    assert json.loads(r.stdout.strip().splitlines()[-1])["argv"] == stage["argv"]
    assert (tmp_path / "x" / "metrics.jsonl").exists()
    assert json.loads((tmp_path / f"{job}.log").read_text())["argv"] == stage["argv"]
    assert not (home / ".exists").exists()  # deleted
    assert (home / "jaxrlhf" / "jaxrlhf" / "distributed.py").exists()  # the committed tree (git archive HEAD)
    assert not Path(f"/tmp/jaxrlhf-{job}.tar.gz").exists()  # the local tarball is cleaned up


def test_missing_tpu_without_accelerator_type(tmp_path):
    env = shim_env(tmp_path, FAKE_TPU_HOME=str(tmp_path))
    r = run([sys.executable, SCRIPT, "nope", "zone-a", "--", "sft"], env)
    assert r.returncode == 1 and "no TPU VM 'nope' in zone-a" in r.stderr and "--accelerator-type" in r.stderr
