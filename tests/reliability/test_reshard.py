"""Resharding: the train checkpoints and stage checkpoints of every stage, written on 8 fake devices
(``fsdp=8``), restore on another mesh with equal params: 8 -> 1 -> 4 devices.

For each row of the shared stage table (``_stages.py``: SFT, RM on it, DPO on it, PPO, GRPO and RLOO on it
against the RM; a later stage adds a row there) the uninterrupted run on 8 devices (the ``uninterrupted``
fixture, shared with the kill test) is the starting point. Then one process with 1 device, and after it one
with 4, reruns every stage's command (``jaxrlhf.cli.main`` with the command's own argv, one stage after the
other) on a copy of its run directory with ``train.mesh`` (a key that may change on resume) left to fit the
new device count: the stage's own runner restores the newest train checkpoint onto that mesh (the log's
"resumed from <copy>/checkpoints at step N" at the last step), runs no step, and writes the stage checkpoint
again from the restored state. Those stage checkpoints (written on 1 and 4 devices) are loaded by the
4-device process (so 8 -> 1 -> 4) and must equal the 8-device params exactly. The 8-device stage
checkpoints are loaded with ``load_stage(mesh=...)`` here (8 devices) and in the 1- and 4-device processes:
equal values, and on 4 devices really sharded. Two processes for all stages (not one per stage and mesh):
each restart costs a process start, and the restore path is the same.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import _chaos
import _reshard_dump
import _stages
import numpy as np
import pytest

pytestmark = pytest.mark.slow

HERE = os.path.dirname(os.path.abspath(__file__))
STAGES = [s[0] for s in _stages.STAGES]  # every row of the shared table (_stages.py)


def _env(devices: int, cache: str) -> dict:
    env = _chaos.env(cache)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _process(devices: int, commands: list[list[str]], stages: list[str], d, cache: str):
    """Run ``commands`` then dump ``stages`` in one process of ``devices`` devices: (its log, the dump)."""
    out, log = d / f"dump-{devices}.npz", d / f"process-{devices}.log"
    plan = d / f"plan-{devices}.json"
    plan.write_text(json.dumps({"commands": commands, "stages": stages, "out": str(out)}))
    with open(log, "w") as f:
        p = subprocess.run(
            [sys.executable, os.path.join(HERE, "_reshard_dump.py"), str(plan)], env=_env(devices, cache),
            stdout=f, stderr=subprocess.STDOUT, cwd=_chaos.ROOT, timeout=_chaos.TIMEOUT * len(STAGES),
        )  # fmt: skip
    text = log.read_text()
    assert p.returncode == 0, text[-4000:]
    return text, dict(np.load(out))


def _resumed_at(log: str, run_dir) -> int | None:
    where = re.escape(os.path.join(str(run_dir), "checkpoints"))
    m = re.search(rf"resumed from {where} at step (\d+)", log)
    return int(m.group(1)) if m else None


@pytest.fixture(scope="module")
def runs(uninterrupted, tmp_path_factory):
    """The shared uninterrupted runs (8 devices), each resumed on copies with 1 and 4 devices, and the
    stage checkpoints of all of them dumped on 8 (here), 1 and 4 devices."""
    d = tmp_path_factory.mktemp("reshard")
    cache = uninterrupted.cache
    out, item8, commands = {}, [], {1: [], 4: []}
    for stage in STAGES:
        run8 = uninterrupted.run_dir(stage)
        extras = _stages.EXTRAS.get(stage, ())
        for n in (1, 4):
            copy = d / stage / str(n)
            shutil.copytree(run8, copy)
            shutil.rmtree(copy / "stage")
            commands[n].append(uninterrupted.command(stage, str(copy))[3:])  # the argv after "-m jaxrlhf.cli"
        total = _stages.total_steps(_stages.ROWS[stage][1])
        out[stage] = {"8": run8, "extras": extras, "total": total}
        item8.append(f"{os.path.join(run8, 'stage')}:{','.join(extras)}")
    out["dump8"] = _reshard_dump.dump(item8)  # this process: the 8 devices of tests/conftest.py
    log1, out["dump1"] = _process(1, commands[1], item8, d, cache)
    # the stage checkpoints written from the train states restored on 1 and 4 devices, all loaded on 4:
    # item len(STAGES) + 2 * i + j is stage i resumed on (1, 4)[j]
    resumed = [f"{d / s / str(n) / 'stage'}:{','.join(out[s]['extras'])}" for s in STAGES for n in (1, 4)]
    log4, out["dump4"] = _process(4, commands[4], item8 + resumed, d, cache)
    for stage in STAGES:
        out[stage]["resumed"] = {n: _resumed_at(log, d / stage / str(n)) for n, log in ((1, log1), (4, log4))}
    return out


def _values(dump, index):
    return {k.split("/", 1)[1]: v for k, v in dump.items() if k.startswith(f"{index}/") and "#" not in k}


@pytest.mark.parametrize("index,stage", list(enumerate(STAGES)))
def test_stage_checkpoint_loads_on_1_and_4_devices(runs, index, stage):
    ref = _values(runs["dump8"], index)
    assert ref and int(runs["dump8"]["#devices"]) == 8
    for n in (1, 4):
        dump = runs[f"dump{n}"]
        assert int(dump["#devices"]) == n
        got = _values(dump, index)
        assert sorted(got) == sorted(ref)
        for k in ref:
            np.testing.assert_array_equal(got[k], ref[k], err_msg=f"{stage} {k} on {n} devices")
    sharded = [k for k in ref if int(runs["dump4"][f"{index}/{k}#shards"]) == 4]
    assert sharded, f"{stage}: no leaf sharded over the 4 devices"


@pytest.mark.parametrize("stage", STAGES)
def test_train_checkpoint_resumes_on_1_and_4_devices(runs, stage):
    r = runs[stage]
    for n in (1, 4):
        assert r["resumed"][n] == r["total"], f"{stage} on {n} devices: resumed at {r['resumed'][n]}"
    index = STAGES.index(stage)
    ref = _values(runs["dump8"], index)
    for j, n in enumerate((1, 4)):
        got = _values(runs["dump4"], len(STAGES) + 2 * index + j)
        assert sorted(got) == sorted(ref)
        for k in ref:  # the stage written from the train state restored on n devices
            np.testing.assert_array_equal(got[k], ref[k], err_msg=f"{stage} {k} resumed on {n} devices")
