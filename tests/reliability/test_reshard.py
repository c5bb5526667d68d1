"""Resharding: the train checkpoints and stage checkpoints of every stage, written on 8 fake devices
(``fsdp=8``), restore on another mesh with equal params: 8 -> 1 -> 4 devices.

For each stage of :data:`STAGES` (SFT, RM on it, DPO on it; a later stage adds a row): the CLI runs on 8
devices. Then, in a process with 1 device and again in one with 4, the same command is rerun on a copy of
the run directory with ``train.mesh`` (a key that may change on resume) left to fit the new device count:
the stage's own runner restores the newest train checkpoint onto that mesh (the log's "resumed from ... at
step N" at the last step), runs no step, and writes the stage checkpoint again from the restored state; those
stage checkpoints (written on 1 and 4 devices) are loaded on 4 devices (so 8 -> 1 -> 4) and must equal the
8-device params exactly. The 8-device stage checkpoints are also loaded with
``load_stage(mesh=...)`` in the 1- and 4-device processes: equal values, and on 4 devices really sharded.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import _chaos
import numpy as np
import pytest

pytestmark = pytest.mark.slow

HERE = os.path.dirname(os.path.abspath(__file__))
COMMON = [
    "train.log_every=1",
    "train.progress=false",
    "train.tensorboard=false",
    "export.hf=false",
    "checkpoint.every=2",
]
STAGES = [
    ("sft", "configs/tiny/sft.yaml", ["optim.total_steps=4", "train.eval_every=4", "samples.num=0"], ()),
    (
        "rm",
        "configs/tiny/rm.yaml",
        ["model.path={sft}", "optim.total_steps=4", "train.eval_every=4"],
        ("reward_head",),
    ),
    (
        "dpo",
        "configs/tiny/dpo.yaml",
        ["model.path={sft}", "optim.total_steps=4", "train.eval_every=4", "samples.num=0"],
        (),
    ),
]


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


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("reshard")
    cache = str(d / "jax_cache")
    shared = [f"tokenizer.cache_dir={d / 'tok'}", f"data.cache_dir={d / 'data'}"]
    out, sft = {}, ""
    for stage, config, sets, extras in STAGES:
        run8 = d / stage / "8"
        args = [s.replace("{sft}", sft) for s in sets] + COMMON + shared
        cmd = _chaos.command(stage, os.path.join(_chaos.ROOT, config), args + [f"output_dir={run8}"])
        _run(cmd, 8, cache, d / f"{stage}-8.log")
        if stage == "sft":
            sft = str(run8 / "stage")
        resumed = {}
        for n in (1, 4):
            copy = d / stage / str(n)
            shutil.copytree(run8, copy)
            shutil.rmtree(copy / "stage")
            cmd = _chaos.command(stage, os.path.join(_chaos.ROOT, config), args + [f"output_dir={copy}"])
            resumed[n] = _chaos._RESUMED.search(_run(cmd, n, cache, d / f"{stage}-{n}.log"))
        out[stage] = {"8": run8, "resumed": resumed, "extras": extras, "total": 4}
    items = [f"{out[s]['8'] / 'stage'}:{','.join(out[s]['extras'])}" for s, *_ in STAGES]
    for n in (8, 1, 4):
        f = d / f"dump-{n}.npz"
        subprocess.run(
            [sys.executable, os.path.join(HERE, "_reshard_dump.py"), str(f), *items],
            env=_env(n, cache), check=True, cwd=_chaos.ROOT, timeout=_chaos.TIMEOUT,
        )  # fmt: skip
        out[f"dump{n}"] = dict(np.load(f))
    for stage, *_ in STAGES:
        items = [
            f"{out[stage]['8'].parent / str(n) / 'stage'}:{','.join(out[stage]['extras'])}" for n in (1, 4)
        ]
        f = d / f"resumed-{stage}.npz"
        subprocess.run(
            [sys.executable, os.path.join(HERE, "_reshard_dump.py"), str(f), *items],
            env=_env(4, cache), check=True, cwd=_chaos.ROOT, timeout=_chaos.TIMEOUT,
        )  # fmt: skip
        out[stage]["resumed_dump"] = dict(np.load(f))
    return out


def _values(dump, index):
    return {k.split("/", 1)[1]: v for k, v in dump.items() if k.startswith(f"{index}/") and "#" not in k}


@pytest.mark.parametrize("index,stage", list(enumerate(s[0] for s in STAGES)))
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


@pytest.mark.parametrize("stage", [s[0] for s in STAGES])
def test_train_checkpoint_resumes_on_1_and_4_devices(runs, stage):
    r = runs[stage]
    for n in (1, 4):
        m = r["resumed"][n]
        assert m is not None and int(m.group(1)) == r["total"], f"{stage} on {n} devices did not resume"
    ref = _values(runs["dump8"], [s[0] for s in STAGES].index(stage))
    for i, n in enumerate((1, 4)):
        got = _values(r["resumed_dump"], i)
        assert sorted(got) == sorted(ref)
        for k in ref:  # the stage written from the train state restored on n devices
            np.testing.assert_array_equal(got[k], ref[k], err_msg=f"{stage} {k} resumed on {n} devices")
