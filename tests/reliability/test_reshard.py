"""Resharding: the train checkpoints and stage checkpoints of every stage, written on 8 fake devices
(``fsdp=8``), restore on another mesh with equal params: 8 -> 1 -> 4 devices.

For each row of the shared stage table (``_stages.py``: SFT, RM on it, DPO on it, PPO and GRPO on it
against the RM; a later stage adds a row there) the uninterrupted run on 8 devices (the ``uninterrupted``
fixture, shared with the kill test) is the starting point. Then, in a process with 1 device and again in
one with 4, the same command is rerun on a copy of the run directory with ``train.mesh`` (a key that may
change on resume) left to fit the new device count: the stage's own runner restores the newest train
checkpoint onto that mesh (the log's "resumed from ... at step N" at the last step), runs no step, and
writes the stage checkpoint again from the restored state; those stage checkpoints (written on 1 and 4
devices) are loaded on 4 devices (so 8 -> 1 -> 4) and must equal the 8-device params exactly. The 8-device
stage checkpoints are also loaded with ``load_stage(mesh=...)`` in the 1- and 4-device processes: equal
values, and on 4 devices really sharded.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import _chaos
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


def _run(cmd, devices, cache, log):
    with open(log, "w") as f:
        p = subprocess.run(
            cmd, env=_env(devices, cache), stdout=f, stderr=subprocess.STDOUT, cwd=_chaos.ROOT,
            timeout=_chaos.TIMEOUT,
        )  # fmt: skip
    text = open(log).read()
    assert p.returncode == 0, text[-4000:]
    return text


def _dump(out, items, devices, cache):
    subprocess.run(
        [sys.executable, os.path.join(HERE, "_reshard_dump.py"), str(out), *items],
        env=_env(devices, cache), check=True, cwd=_chaos.ROOT, timeout=_chaos.TIMEOUT,
    )  # fmt: skip
    return dict(np.load(out))


@pytest.fixture(scope="module")
def runs(uninterrupted, tmp_path_factory):
    """The shared uninterrupted runs (8 devices), each resumed on copies with 1 and 4 devices, and the
    stage checkpoints of all of them dumped by processes of 8, 1 and 4 devices."""
    d = tmp_path_factory.mktemp("reshard")
    cache = uninterrupted.cache
    out = {}
    for stage in STAGES:
        run8 = uninterrupted.run_dir(stage)
        resumed = {}
        for n in (1, 4):
            copy = d / stage / str(n)
            shutil.copytree(run8, copy)
            shutil.rmtree(copy / "stage")
            cmd = uninterrupted.command(stage, str(copy))  # the same command; output_dir may change
            resumed[n] = _chaos._RESUMED.search(_run(cmd, n, cache, d / f"{stage}-{n}.log"))
        extras = _stages.EXTRAS.get(stage, ())
        total = _stages.total_steps(_stages.ROWS[stage][1])
        out[stage] = {"8": run8, "resumed": resumed, "extras": extras, "total": total}
    items = [f"{os.path.join(out[s]['8'], 'stage')}:{','.join(out[s]['extras'])}" for s in STAGES]
    for n in (8, 1, 4):
        out[f"dump{n}"] = _dump(d / f"dump-{n}.npz", items, n, cache)
    # the stage checkpoints written from the train states restored on 1 and 4 devices, all loaded on 4:
    # item 2 * i + j is stage i resumed on (1, 4)[j]
    items = [f"{d / s / str(n) / 'stage'}:{','.join(out[s]['extras'])}" for s in STAGES for n in (1, 4)]
    out["resumed_dump"] = _dump(d / "resumed.npz", items, 4, cache)
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
        m = r["resumed"][n]
        assert m is not None and int(m.group(1)) == r["total"], f"{stage} on {n} devices did not resume"
    index = STAGES.index(stage)
    ref = _values(runs["dump8"], index)
    for j, n in enumerate((1, 4)):
        got = _values(runs["resumed_dump"], 2 * index + j)
        assert sorted(got) == sorted(ref)
        for k in ref:  # the stage written from the train state restored on n devices
            np.testing.assert_array_equal(got[k], ref[k], err_msg=f"{stage} {k} resumed on {n} devices")
