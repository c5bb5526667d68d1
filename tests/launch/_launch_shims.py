"""Stand-ins for python3 / srun / scontrol / gcloud on PATH, so the launchers run here end to end.

Each shim appends one JSON line ``{"tool", "argv", "env"}`` to ``$SHIM_LOG``; ``env`` holds the JAX_*, SLURM_*
and forwarded variables it saw.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch"

_COMMON = f"""#!{sys.executable}
import json, os, shutil, subprocess, sys
from pathlib import Path

def record(tool):
    env = {{k: v for k, v in os.environ.items() if k.startswith(("JAX_", "SLURM_", "HF_", "FORWARD"))}}
    line = json.dumps({{"tool": tool, "argv": sys.argv[1:], "env": env, "cwd": os.getcwd()}})
    with open(os.environ["SHIM_LOG"], "a") as f:
        f.write(line + "\\n")
    return line
"""

PYTHON = """
line = record("python3")
if sys.argv[1:3] == ["-m", "jaxrlhf"]:
    print(line, flush=True)
    sys.exit(int(os.environ.get("SHIM_EXIT", "0")))
"""

SCONTROL = """
record("scontrol")
assert sys.argv[1:3] == ["show", "hostnames"], sys.argv
print(os.environ["SHIM_HOSTS"].replace(",", "\\n"))
"""

SRUN = """
record("srun")
args = sys.argv[1:]
i = next(i for i, a in enumerate(args) if not a.startswith("-"))
opts = dict(a.lstrip("-").split("=", 1) for a in args[:i] if "=" in a)
status = 0
for rank in range(int(opts.get("ntasks", os.environ["SLURM_NTASKS"]))):
    env = {**os.environ, "SLURM_PROCID": str(rank), "SLURM_LOCALID": "0"}
    status = max(status, subprocess.call(args[i:], env=env))
sys.exit(status)
"""

GCLOUD = """
record("gcloud")
args = sys.argv[1:]
assert args[:3] == ["compute", "tpus", "tpu-vm"], args
verb, home = args[3], Path(os.environ["FAKE_TPU_HOME"])
flags = [a for a in args[4:] if a.startswith("--")]
plain = [a for a in args[4:] if not a.startswith("--")]
if verb == "describe":
    if not (home / ".exists").exists():
        print("ERROR: NOT_FOUND", file=sys.stderr)
        sys.exit(1)
    print("READY")
elif verb == "create":
    (home / ".exists").touch()
elif verb == "ssh":
    command = next(a for a in flags if a.startswith("--command="))[len("--command="):]
    sys.exit(subprocess.call(["bash", "-c", command], cwd=home))
elif verb == "scp":
    *sources, dest = plain
    local = lambda p: home / p.split(":", 1)[1] if ":" in p else Path(p)
    for src in sources:
        target = local(dest) / local(src).name if local(dest).is_dir() else local(dest)
        if local(src).is_dir():
            shutil.copytree(local(src), target)
        else:
            shutil.copy(local(src), target)
elif verb == "delete":
    (home / ".exists").unlink(missing_ok=True)
"""


def install(bin_dir: Path) -> Path:
    """Write the shims into ``bin_dir``; returns it (put it first on PATH)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, body in [("python3", PYTHON), ("scontrol", SCONTROL), ("srun", SRUN), ("gcloud", GCLOUD)]:
        path = bin_dir / name
        path.write_text(_COMMON + body)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return bin_dir


def shim_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A clean environment with the shims first on PATH and an empty ``$SHIM_LOG``."""
    bin_dir = install(tmp_path / "bin")
    log = tmp_path / "shim.jsonl"
    log.write_text("")
    keep = {k: os.environ[k] for k in ("HOME", "LANG", "TMPDIR") if k in os.environ}
    return {**keep, "PATH": f"{bin_dir}:/usr/bin:/bin", "SHIM_LOG": str(log), **extra}


def calls(env: dict[str, str], tool: str | None = None) -> list[dict]:
    rows = [json.loads(line) for line in Path(env["SHIM_LOG"]).read_text().splitlines()]
    return [r for r in rows if tool is None or r["tool"] == tool]


def run(argv: list[str], env: dict[str, str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, **kw)
