#!/usr/bin/env python3
"""Run a jaxrlhf stage on every host of a Cloud TPU VM slice (v4 / v5e / v5p / v6e ...) from a laptop.

    launch/tpu_pod.py my-v5p-32 us-east5-a --accelerator-type v5p-32 --install copy \\
        --copy-back runs/llama3 -- sft --config configs/llama3_8b/sft_lora.yaml --set optim.total_steps=1000

Steps, each a gcloud command (--dry-run prints them, one per line, and runs nothing; lines starting with
"#" say when a step applies):

1. `gcloud compute tpus tpu-vm describe`: reuse the TPU VM NAME in ZONE; if there is none and
   --accelerator-type is given, `tpu-vm create` it (--runtime-version, default by TPU generation; --spot).
2. --install copy: `git archive HEAD` of this repository, `scp --worker=all`, unpack into REMOTE_DIR and
   `pip install --user -e 'REMOTE_DIR[tpu]'` on every worker; --install git: `pip install 'jaxrlhf[tpu] @
   git+URL'`; --install wheel: scp the wheel and pip install it. Without --install the last install is reused.
   (git / wheel installs do not copy configs/: point --config at a file every worker can read.)
3. `ssh --worker=all`: in REMOTE_DIR, start `python3 -m jaxrlhf STAGE ARGS... --distributed` in the
   background (nohup; the job survives a dropped connection), output to REMOTE_DIR/.launch/JOB.log. On a TPU
   VM `--distributed` lets JAX read the coordinator, host count and host index from the TPU metadata server.
4. `ssh --worker=0`: stream worker 0's log until its process ends; exit with its status.
5. --copy-back PATH: `scp --recurse --worker=0` REMOTE_DIR/PATH and worker 0's log to --to (default .).
   A multi-host checkpoint is only whole on storage every host writes to (GCS, Filestore/NFS): give such an
   output_dir for real runs; the copy then brings back what worker 0 sees.
6. --delete: `tpu-vm delete --quiet` at the end, also after a failure.

The stage command after -- is passed through verbatim (quoted for the remote shell). --env NAME forwards
the local value of NAME (e.g. HF_TOKEN, WANDB_API_KEY); --dry-run shows "<NAME from local environment>"
instead of the value; --env NAME=VALUE forwards VALUE as given.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# TPU generation -> runtime version for `tpu-vm create` (Cloud TPU docs, "TPU software versions")
RUNTIMES = {
    "v2": "tpu-ubuntu2204-base",
    "v3": "tpu-ubuntu2204-base",
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    cut = argv.index("--") if "--" in argv else len(argv)
    head, stage = argv[:cut], argv[cut + 1 :]
    p = argparse.ArgumentParser(
        prog="launch/tpu_pod.py",
        usage="%(prog)s NAME ZONE [options] -- STAGE [ARGS...]",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("name", help="TPU VM name")
    p.add_argument("zone", help="zone, e.g. us-central2-b")
    p.add_argument("--project", help="Google Cloud project (default: gcloud's)")
    p.add_argument("--accelerator-type", help="create the TPU VM if missing, e.g. v4-32, v5p-64, v6e-16")
    p.add_argument("--runtime-version", help="TPU software version (default: by TPU generation)")
    p.add_argument("--spot", action="store_true", help="create a Spot TPU VM")
    p.add_argument("--install", choices=("copy", "git", "wheel"), help="install jaxrlhf on every worker")
    p.add_argument("--git-url", help="with --install git: e.g. https://github.com/ORG/jaxrlhf@main")
    p.add_argument("--wheel", help="with --install wheel: a jaxrlhf wheel file")
    p.add_argument(
        "--remote-dir", default="jaxrlhf", help="workers' working directory: relative to $HOME or absolute"
    )
    p.add_argument("--env", action="append", default=[], metavar="NAME[=VALUE]", help="forward a variable")
    p.add_argument("--job-name", help="names the log / pid files (default: STAGE-<time>)")
    p.add_argument(
        "--copy-back", metavar="PATH", help="directory under --remote-dir to copy back, e.g. runs/x"
    )
    p.add_argument("--to", default=".", help="local destination of --copy-back (default .)")
    p.add_argument("--delete", action="store_true", help="delete the TPU VM at the end")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = p.parse_args(head)
    if not stage or stage[0].startswith("-"):
        p.error("give the jaxrlhf command after --, e.g. -- sft --config configs/tiny/sft.yaml")
    if stage[0] == "generate":
        p.error("jaxrlhf generate runs on one host; ssh to worker 0 and run it there")
    if args.install == "git" and not args.git_url:
        p.error("--install git needs --git-url")
    if args.install == "wheel" and not args.wheel:
        p.error("--install wheel needs --wheel FILE")
    if args.accelerator_type and not args.runtime_version:
        generation = args.accelerator_type.split("-")[0]
        if generation not in RUNTIMES:
            p.error(f"no default runtime for {args.accelerator_type!r}: pass --runtime-version")
        args.runtime_version = RUNTIMES[generation]
    if not args.job_name:
        import time

        args.job_name = f"{stage[0]}-{time.strftime('%Y%m%d-%H%M%S')}"
    for item in args.env:
        name = item.split("=", 1)[0]
        if not name.isidentifier():
            p.error(f"--env {item!r}: not a variable name")
        if "=" not in item and not args.dry_run and name not in os.environ:
            p.error(f"--env {name}: not set in the local environment")
    return args, stage


def _as_path(path: str) -> str:
    """What pip reads as a directory rather than a package name."""
    return path if path.startswith(("/", "./", "../")) else "./" + path


class Plan:
    """The gcloud commands of one launch; ``steps`` are ``(kind, argv)`` with kind "run", "check", "note"."""

    def __init__(self, args: argparse.Namespace, stage: list[str]):
        self.args, self.stage = args, stage
        self.scope = [f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])
        self.tpu = ["gcloud", "compute", "tpus", "tpu-vm"]

    def ssh(self, worker: str, command: str) -> list[str]:
        return [*self.tpu, "ssh", self.args.name, *self.scope, f"--worker={worker}", f"--command={command}"]

    def scp(self, worker: str, *paths: str, recurse: bool = False) -> list[str]:
        flags = ["--recurse"] if recurse else []
        return [*self.tpu, "scp", *flags, *paths, *self.scope, f"--worker={worker}"]

    def describe(self) -> list[str]:
        return [*self.tpu, "describe", self.args.name, *self.scope, "--format=value(state)"]

    def create(self) -> list[str]:
        a = self.args
        cmd = [*self.tpu, "create", a.name, *self.scope, f"--accelerator-type={a.accelerator_type}"]
        return cmd + [f"--version={a.runtime_version}"] + (["--spot"] if a.spot else [])

    def install(self) -> list[list[str]]:
        a, d = self.args, shlex.quote(self.args.remote_dir)
        pip = "python3 -m pip install --user -q"
        if a.install == "copy":
            tarball = f"/tmp/jaxrlhf-{a.job_name}.tar.gz"  # removed after the copy
            unpack = (
                f"mkdir -p {d} && rm -rf {d}/jaxrlhf {d}/configs && tar -xzf jaxrlhf-src.tar.gz -C {d}"
                f" && {pip} -e {shlex.quote(_as_path(a.remote_dir) + '[tpu]')}"
            )
            return [
                ["git", "-C", str(REPO), "archive", "--format=tar.gz", "-o", tarball, "HEAD"],
                self.scp("all", tarball, f"{a.name}:jaxrlhf-src.tar.gz"),
                self.ssh("all", unpack),
            ]
        if a.install == "git":
            return [
                self.ssh("all", f"mkdir -p {d} && {pip} {shlex.quote('jaxrlhf[tpu] @ git+' + a.git_url)}")
            ]
        wheel = Path(a.wheel).name
        return [
            self.scp("all", a.wheel, f"{a.name}:{wheel}"),
            self.ssh("all", f"mkdir -p {d} && {pip} {shlex.quote('./' + wheel + '[tpu]')}"),
        ]

    def exports(self) -> str:
        out = []
        for item in self.args.env:
            name, sep, value = item.partition("=")
            if not sep:
                value = f"<{name} from local environment>" if self.args.dry_run else os.environ[name]
            out.append(f"export {name}={shlex.quote(value)}; ")
        return "".join(out)

    def stage_command(self) -> list[str]:
        cmd = ["python3", "-m", "jaxrlhf", *self.stage]
        return cmd + ([] if "--distributed" in self.stage else ["--distributed"])

    def start(self) -> list[str]:
        job = f".launch/{self.args.job_name}"
        body = f"{self.exports()}{shlex.join(self.stage_command())}; echo $? > {shlex.quote(job + '.rc')}"
        background = (  # braces: `&` backgrounds only nohup, and $! is its pid
            f"{{ nohup bash -c {shlex.quote(body)} > {shlex.quote(job + '.log')} 2>&1 < /dev/null &"
            f" echo $! > {shlex.quote(job + '.pid')}; }}"
        )
        return self.ssh("all", f"cd {shlex.quote(self.args.remote_dir)} && mkdir -p .launch && {background}")

    def stream(self) -> list[str]:
        job = shlex.quote(f".launch/{self.args.job_name}")
        follow = (
            f'cd {shlex.quote(self.args.remote_dir)} && tail -n +1 --pid="$(cat {job}.pid)" -F {job}.log;'
            f' exit "$(cat {job}.rc 2>/dev/null || echo 1)"'
        )
        return self.ssh("0", follow)

    def copy_back(self) -> list[str]:
        a = self.args
        sources = [
            f"{a.name}:{a.remote_dir}/{a.copy_back}",
            f"{a.name}:{a.remote_dir}/.launch/{a.job_name}.log",
        ]
        return self.scp("0", *sources, a.to, recurse=True)

    def delete(self) -> list[str]:
        return [*self.tpu, "delete", self.args.name, *self.scope, "--quiet"]


def _print(cmd: list[str]) -> None:
    print(shlex.join(cmd), flush=True)


def dry_run(plan: Plan) -> None:
    _print(plan.describe())
    if plan.args.accelerator_type:
        print(f"# if {plan.args.name} does not exist in {plan.args.zone}:")
        _print(plan.create())
    if plan.args.install:
        for cmd in plan.install():
            _print(cmd)
    _print(plan.start())
    _print(plan.stream())
    if plan.args.copy_back:
        _print(plan.copy_back())
    if plan.args.delete:
        _print(plan.delete())


def _run(cmd: list[str], *, check: bool = True) -> int:
    print("+ " + shlex.join(cmd), file=sys.stderr, flush=True)
    rc = subprocess.run(cmd).returncode
    if check and rc:
        raise SystemExit(f"tpu_pod.py: command failed with status {rc}: {shlex.join(cmd)}")
    return rc


def launch(plan: Plan) -> int:
    a = plan.args
    print("+ " + shlex.join(plan.describe()), file=sys.stderr, flush=True)
    state = subprocess.run(plan.describe(), capture_output=True, text=True)
    try:
        if state.returncode:
            if not a.accelerator_type:
                raise SystemExit(
                    f"tpu_pod.py: no TPU VM {a.name!r} in {a.zone} ({state.stderr.strip()}); "
                    "pass --accelerator-type (and --runtime-version) to create it"
                )
            _run(plan.create())
        elif state.stdout.strip() not in ("READY", ""):
            raise SystemExit(f"tpu_pod.py: TPU VM {a.name!r} is {state.stdout.strip()}, not READY")
        if (
            a.install == "copy"
            and subprocess.run(
                ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
            ).stdout.strip()
        ):
            print(
                "tpu_pod.py: warning: uncommitted changes are not copied (git archive HEAD)", file=sys.stderr
            )
        if a.install:
            for cmd in plan.install():
                _run(cmd)
            Path(f"/tmp/jaxrlhf-{a.job_name}.tar.gz").unlink(missing_ok=True)
        _run(plan.start())
        status = _run(plan.stream(), check=False)
        if a.copy_back:
            _run(plan.copy_back(), check=False)
        return status
    finally:
        if a.delete:
            _run(plan.delete(), check=False)


def main(argv: list[str] | None = None) -> int:
    args, stage = parse_args(sys.argv[1:] if argv is None else argv)
    plan = Plan(args, stage)
    if args.dry_run:
        dry_run(plan)
        return 0
    return launch(plan)


if __name__ == "__main__":
    sys.exit(main())
