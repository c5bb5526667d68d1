"""Kill anywhere, lose nothing: every training stage, SIGKILLed at seeded random moments, mid async
train-checkpoint write and mid stage save, then restarted with the same command, ends with the parameters of
an uninterrupted run; a partly written checkpoint or stage directory is never picked up.

Each row of :data:`STAGES` is ``(stage, config file, --set values)``; ``{sft}`` in a value is replaced by the
stage checkpoint of the uninterrupted SFT run (the base of the later stages). Add a stage by adding a row
(e.g. ``("ppo", "configs/tiny/ppo.yaml", [...])``) with tiny step counts, ``checkpoint.every`` small enough
for a few checkpoints, ``train.log_every=1`` (the step trigger reads ``metrics.jsonl``) and extras named in
:data:`EXTRAS` when the stage checkpoint carries pytrees beside the params.

Per stage: one uninterrupted run, then the same command is started, SIGKILLed, and started again, once for
each kill of :func:`kills` (the first async checkpoint write in flight, a random step plus a random delay, the
stage save in flight), and once more to the end. Checked: each kill that waited for a
partial directory found it still there after the kill; every restart after a kill resumed from the newest
checkpoint complete at the kill (the log's "resumed from ... at step N"), never a partial one; the final stage
parameters (and extras) equal the uninterrupted run's; every train step is logged once with the same loss;
no partial stage directory is left behind, and a partial train checkpoint left by a kill is never listed.
"""

from __future__ import annotations

import os
import random

import _chaos
import chex
import numpy as np
import pytest

from jaxrlhf import train

pytestmark = pytest.mark.slow

COMMON = [
    "train.log_every=1",
    "train.progress=false",
    "train.tensorboard=false",
    "checkpoint.keep=2",
    "export.hf=false",
]
STAGES = [
    (
        "sft",
        "configs/tiny/sft.yaml",
        [
            "optim.total_steps=8",
            "optim.warmup_steps=2",
            "checkpoint.every=2",
            "train.eval_every=4",
            "samples.num=0",
        ],
    ),
    (
        "rm",
        "configs/tiny/rm.yaml",
        ["model.path={sft}", "optim.total_steps=6", "checkpoint.every=2", "train.eval_every=3"],
    ),
    (
        "dpo",
        "configs/tiny/dpo.yaml",
        [
            "model.path={sft}",
            "optim.total_steps=6",
            "checkpoint.every=2",
            "train.eval_every=3",
            "samples.num=0",
        ],
    ),
]
EXTRAS = {"rm": ("reward_head",)}
SEED = 15


def kills(rng: random.Random, total_steps: int) -> list[_chaos.Kill]:
    """The kills of one stage, in order (seeded)."""
    return [  # the checkpoint kill first: a fresh run writes every checkpoint, so it has the most chances
        _chaos.Kill("checkpoint_tmp"),
        _chaos.Kill("step", at=rng.randint(1, total_steps - 1), delay=rng.uniform(0.0, 0.3)),
        _chaos.Kill("stage_tmp"),
    ]


def _total_steps(sets: list[str]) -> int:
    return int(next(s for s in sets if s.startswith("optim.total_steps=")).split("=")[1])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("chaos")
    return {
        "dir": d,
        "cache": str(d / "jax_cache"),
        "shared": [f"tokenizer.cache_dir={d / 'tok'}", f"data.cache_dir={d / 'data'}"],
        "sft": None,
    }


def _sets(base, sets, out):
    sft = base["sft"] or ""
    return [s.replace("{sft}", sft) for s in sets] + COMMON + base["shared"] + [f"output_dir={out}"]


def _steps(run_dir) -> list[dict]:
    return [r for r in train.read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if "loss" in r]


@pytest.mark.parametrize(("stage", "config", "sets"), STAGES, ids=[s[0] for s in STAGES])
def test_killed_and_restarted_equals_uninterrupted(base, stage, config, sets):
    config = os.path.join(_chaos.ROOT, config)
    d = base["dir"] / stage
    d.mkdir()
    ref_dir, chaos_dir = str(d / "ref"), str(d / "chaos")
    ref_cmd = _chaos.command(stage, config, _sets(base, sets, ref_dir))
    ref = _chaos.run(ref_cmd, ref_dir, str(d / "ref.log"), base["cache"])
    assert ref.returncode == 0, ref.log[-4000:]
    if stage == "sft":
        base["sft"] = os.path.join(ref_dir, "stage")

    cmd = _chaos.command(stage, config, _sets(base, sets, chaos_dir))
    rng = random.Random(f"{SEED}:{stage}")
    total = _total_steps(sets)
    landed, previous = [], None
    for i, kill in enumerate(kills(rng, total)):
        out = _chaos.run(cmd, chaos_dir, str(d / f"chaos-{i}.log"), base["cache"], kill)
        if previous is not None and previous.killed:
            _check_resume(previous, out, i)
        if not out.killed:
            assert out.returncode == 0, out.log[-4000:]
            previous = None
            continue
        if kill.when != "step":
            assert out.partial_seen, f"kill {i} ({kill.when}) did not land mid-write"
        landed.append(kill.when)
        previous = out
    final = _chaos.run(cmd, chaos_dir, str(d / "chaos-final.log"), base["cache"])
    assert final.returncode == 0, final.log[-4000:]
    if previous is not None:
        _check_resume(previous, final, "final")
    # the kills really happened where they were meant to (each trigger is reached by every stage)
    assert sorted(set(landed)) == ["checkpoint_tmp", "stage_tmp", "step"], landed

    a = train.load_stage(os.path.join(ref_dir, "stage"), extras=EXTRAS.get(stage, ()))
    b = train.load_stage(os.path.join(chaos_dir, "stage"), extras=EXTRAS.get(stage, ()))
    assert a.stage_info["step"] == b.stage_info["step"] == total
    chex.assert_trees_all_close(b.params, a.params, atol=1e-6, rtol=1e-6)
    chex.assert_trees_all_close(b.lora, a.lora, atol=1e-6, rtol=1e-6)
    for name in EXTRAS.get(stage, ()):
        chex.assert_trees_all_close(b.extras[name], a.extras[name], atol=1e-6, rtol=1e-6)
    ra, rb = _steps(ref_dir), _steps(chaos_dir)
    assert [r["step"] for r in rb] == [r["step"] for r in ra] == list(range(1, total + 1))
    np.testing.assert_allclose([r["loss"] for r in rb], [r["loss"] for r in ra], rtol=1e-6, atol=1e-6)
    # a partial stage directory is replaced by the next save; partial train checkpoints a kill left behind
    # stay on disk (Orbax's cleanup_tmp_directories is off) but are never listed nor restored
    leftover = _chaos.partial_dirs(chaos_dir)
    assert "stage.tmp" not in leftover
    mgr = train.CheckpointManager(os.path.join(chaos_dir, "checkpoints"))
    assert mgr.all_steps() == _chaos.complete_steps(chaos_dir) and total in mgr.all_steps()
    mgr.close()


def _check_resume(killed: _chaos.Outcome, restart: _chaos.Outcome, i) -> None:
    """The restart after a kill resumed from the newest checkpoint complete at the kill (None: none was)."""
    want = max(killed.complete_steps) if killed.complete_steps else None
    assert restart.resumed_step == want, (
        f"restart {i}: resumed at {restart.resumed_step}, newest complete checkpoint at the kill {want} "
        f"(partial: {killed.partial_seen})"
    )
