"""Kill anywhere, lose nothing: every training stage, SIGKILLed at seeded random moments, mid async
train-checkpoint write and mid stage save (or sent SIGTERM, as a preemption), then restarted with the same
command, ends with the parameters of an uninterrupted run; a partly written checkpoint or stage directory is
never picked up.

The rows and their uninterrupted runs are shared with the reshard test (``_stages.py``: the
``uninterrupted`` fixture); a stage's kills are :func:`kills` unless :data:`KILLS` names its own. The RL rows
(PPO against the reward model with an adaptive KL controller, a running reward normaliser and an EMA of
the policy; GRPO against it with a KL term; RLOO, GRPO's loop with leave-one-out baselines and the KL in
the reward) check the whole RL state: the final train checkpoint (policy,
critic, optimizer moments, RNG, KL controller, reward normaliser, EMA, prompt position) and the exported
policy equal the uninterrupted run's, and the policy moved from the SFT weights (no vacuous equality).

The ``pipeline`` row (SFT -> RM -> GRPO in one command, each section the stand-alone row's settings) is
killed during the SFT stage save, i.e. at the SFT -> RM boundary, and its rerun is killed again at a random
RM step (a later stage of a resumed pipeline); it has no uninterrupted run of its own: every stage it ends
with must equal the stand-alone rows' uninterrupted runs.

Per stage: one uninterrupted run, then the same command is started, killed, and started again, once for each
kill, and once more to the end. Checked: each kill that waited for a partial directory found it still there
after the kill; every restart after a kill resumed the killed stage run from the newest checkpoint complete
at the kill (the log's "resumed from <run>/checkpoints at step N"), never a partial one; a SIGTERM ended
the run with exit status 143 after saving the checkpoint of the step it stopped at; the final stage
parameters (and extras) equal the uninterrupted run's; every train step is logged once with the same loss;
no partial stage directory is left behind, and a partial train checkpoint left by a kill is never listed.
"""

from __future__ import annotations

import os
import random
import re

import _chaos
import _stages
import chex
import jax
import numpy as np
import pytest

from jaxrlhf import train

pytestmark = pytest.mark.slow

CASES = [*_stages.STAGES, ("pipeline", "configs/tiny/pipeline.yaml", ["method=grpo"])]
PIPELINE = ("sft", "rm", "grpo")  # the pipeline's stages: each as its stand-alone row
SEED = 15


def kills(rng: random.Random, total_steps: int) -> list[_chaos.Kill]:
    """The kills of one stage, in order (seeded)."""
    return [  # the checkpoint kill first: a fresh run writes every checkpoint, so it has the most chances
        _chaos.Kill("checkpoint_tmp"),
        _chaos.Kill("step", at=rng.randint(1, total_steps - 1), delay=rng.uniform(0.0, 0.3)),
        _chaos.Kill("stage_tmp"),
    ]


KILLS = {  # stages whose kills differ from kills(): fewer (each costs a process start), other kinds
    # PPO (all of kills()): mid-checkpoint (the RL train state: policy, critic, KL controller, normaliser,
    # EMA), at a random iteration, during the stage save (value head and EMA policy beside the params)
    # GRPO is preempted (SIGTERM) at a random iteration: it must save the iteration it stops at
    # (checkpoint.every=2: an odd iteration is saved only because of the signal) and exit 143
    "grpo": lambda rng, total: [
        _chaos.Kill("sigterm", at=rng.randint(1, total - 1), delay=rng.uniform(0.0, 0.3))
    ],
    # RLOO (GRPO's loop and checkpoints, its own config): SIGKILL at a random iteration
    "rloo": lambda rng, total: [
        _chaos.Kill("step", at=rng.randint(1, total - 1), delay=rng.uniform(0.0, 0.3))
    ],
    # the pipeline across the SFT -> RM boundary (during SFT's stage save), then the rerun again at a random
    # RM step (a later stage of a resumed pipeline)
    "pipeline": lambda rng, total: [
        _chaos.Kill("stage_tmp", sub="sft"),
        _chaos.Kill(
            "step",
            at=rng.randint(1, _stages.total_steps(_stages.ROWS["rm"][1]) - 1),
            delay=rng.uniform(0.0, 0.3),
            sub="rm",
        ),  # fmt: skip
    ],
}


def _pipeline_sets(refs: _stages.Uninterrupted, out: str) -> list[str]:
    """The pipeline's sections: each stage's stand-alone row (the paths that chain them set by the
    pipeline), the same COMMON settings and caches, and no samples beyond a few short ones."""
    out_sets = ["method=grpo", f"output_dir={out}", "samples.num=2", "samples.sampling.max_new_tokens=4"]
    for stage in PIPELINE:
        for item in _stages.ROWS[stage][1] + _stages.COMMON + refs.shared:
            if item.split("=", 1)[0] in ("model.path", "reward.path", "samples.num"):
                continue  # chained by the pipeline; its own samples section
            out_sets.append(f"{stage}.{item}")
    return out_sets


def _steps(run_dir) -> list[dict]:
    return [r for r in train.read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if "loss" in r]


def _parts(stage: str, run_dir: str) -> list[tuple[str, str]]:
    """``(stage, run dir)`` of each stage run a command makes (a pipeline: several)."""
    if stage != "pipeline":
        return [(stage, run_dir)]
    return [(s, os.path.join(run_dir, s)) for s in PIPELINE]


@pytest.mark.parametrize(("stage", "config", "sets"), CASES, ids=[s[0] for s in CASES])
def test_killed_and_restarted_equals_uninterrupted(uninterrupted, tmp_path, stage, config, sets):
    refs = uninterrupted
    chaos_dir = str(tmp_path / "chaos")
    if stage == "pipeline":  # its stages' uninterrupted runs are the stand-alone rows'
        cmd = _chaos.command(stage, os.path.join(_chaos.ROOT, config), _pipeline_sets(refs, chaos_dir))
        total = 0
    else:
        cmd = refs.command(stage, chaos_dir)
        total = _stages.total_steps(sets)
    wanted = {name: refs.run_dir(name) for name, _ in _parts(stage, chaos_dir)}  # before the chaos

    rng = random.Random(f"{SEED}:{stage}")
    landed, previous = [], None
    plan = KILLS.get(stage, kills)(rng, total)
    for i, kill in enumerate(plan):
        out = _chaos.run(cmd, chaos_dir, str(tmp_path / f"chaos-{i}.log"), refs.cache, kill)
        if previous is not None and previous.killed:
            _check_resume(previous, out, i, os.path.join(chaos_dir, plan[i - 1].sub))
        if not out.killed:
            assert out.returncode == 0, out.log[-4000:]
            previous = None
            continue
        if kill.when == "sigterm":
            _check_preempted(out)
        elif kill.when != "step":
            assert out.partial_seen, f"kill {i} ({kill.when}) did not land mid-write"
        landed.append(kill.when)
        previous = out
    final = _chaos.run(cmd, chaos_dir, str(tmp_path / "chaos-final.log"), refs.cache)
    assert final.returncode == 0, final.log[-4000:]
    if previous is not None:
        _check_resume(previous, final, "final", os.path.join(chaos_dir, plan[-1].sub))
    # the kills really happened where they were meant to (each trigger is reached by every stage)
    assert sorted(set(landed)) == sorted({k.when for k in plan}), landed

    for name, run_dir in _parts(stage, chaos_dir):
        sets = refs.subst(_stages.ROWS[name][1])
        _check_equal(name, wanted[name], run_dir, _stages.total_steps(sets), sets)


def _check_equal(stage: str, ref_dir: str, run_dir: str, total: int, sets: list[str]) -> None:
    """The stage run in ``run_dir`` ended like the uninterrupted ``ref_dir``: params, extras, logged steps."""
    extras = _stages.EXTRAS.get(stage, ())
    a = train.load_stage(os.path.join(ref_dir, "stage"), extras=extras)
    b = train.load_stage(os.path.join(run_dir, "stage"), extras=extras)
    assert a.stage_info["step"] == b.stage_info["step"] == total
    chex.assert_trees_all_close(b.params, a.params, atol=1e-6, rtol=1e-6)
    chex.assert_trees_all_close(b.lora, a.lora, atol=1e-6, rtol=1e-6)
    for name in extras:
        chex.assert_trees_all_close(b.extras[name], a.extras[name], atol=1e-6, rtol=1e-6)
    if stage in (
        "ppo",
        "grpo",
        "rloo",
    ):  # the RL update really moved the policy: equal params are no accident
        start = train.load_stage(next(s for s in sets if s.startswith("model.path="))[len("model.path=") :])
        moved = max(
            float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
            for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(start.params), strict=True)
        )
        assert moved > 1e-4, f"{stage}: the policy did not move from its start ({moved})"
    # the whole train state of the last checkpoint: optimizer moments, RNG, KL controller, reward
    # normaliser, EMA (RL), ... and the data position
    sa, la = _train_state(ref_dir, total)
    sb, lb = _train_state(run_dir, total)
    assert sorted(sb) == sorted(sa) and lb == la, (lb, la)
    for k in sa:
        np.testing.assert_allclose(sb[k], sa[k], rtol=1e-6, atol=1e-6, err_msg=f"{stage} train state {k}")
    ra, rb = _steps(ref_dir), _steps(run_dir)
    assert [r["step"] for r in rb] == [r["step"] for r in ra] == list(range(1, total + 1))
    np.testing.assert_allclose([r["loss"] for r in rb], [r["loss"] for r in ra], rtol=1e-6, atol=1e-6)
    # a partial stage directory is replaced by the next save; partial train checkpoints a kill left behind
    # are never listed nor restored (the restart's CheckpointManager removes them)
    leftover = _chaos.partial_dirs(run_dir)
    assert "stage.tmp" not in leftover
    mgr = train.CheckpointManager(os.path.join(run_dir, "checkpoints"))
    assert mgr.all_steps() == _chaos.complete_steps(run_dir) and total in mgr.all_steps()
    mgr.close()


def _train_state(run_dir: str, step: int) -> tuple[dict, dict]:
    """``({tree path: numpy leaf}, loader state)`` of the train checkpoint ``step`` as saved."""
    import orbax.checkpoint as ocp

    mgr = ocp.CheckpointManager(os.path.join(run_dir, "checkpoints"))
    args = ocp.args.Composite(
        state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore(), loader=ocp.args.JsonRestore()
    )
    out = mgr.restore(step, args=args)
    mgr.close()
    leaves = [np.asarray(jax.device_get(out["state"][k])) for k in sorted(out["state"])]
    return dict(zip(out["meta"]["paths"], leaves, strict=True)), dict(out["loader"] or {})


def _check_preempted(out: _chaos.Outcome) -> None:
    """A run sent SIGTERM exited 143 with the checkpoint of the step it stopped at (or, had the signal
    come after the last step, during the stage save: exit 143 at once, the final checkpoint complete)."""
    assert out.returncode == 143, f"SIGTERM: exit status {out.returncode}\n{out.log[-3000:]}"
    assert "preempted (SIGTERM)" in out.log, out.log[-3000:]
    m = re.search(r"SIGTERM \(preemption\): stopping after step (\d+), saving a checkpoint at step", out.log)
    if m is not None:
        assert int(m.group(1)) == max(out.complete_steps), (m.group(0), out.complete_steps)


def _check_resume(killed: _chaos.Outcome, restart: _chaos.Outcome, i, run_dir: str) -> None:
    """The restart after a kill resumed the stage run ``run_dir`` (the killed one) from the newest checkpoint
    complete at the kill (None: none was)."""
    want = max(killed.complete_steps) if killed.complete_steps else None
    got = _chaos.resumed_step(restart.log, run_dir)
    assert got == want, (
        f"restart {i}: resumed {run_dir} at {got}, newest complete checkpoint at the kill {want} "
        f"(partial: {killed.partial_seen})"
    )
