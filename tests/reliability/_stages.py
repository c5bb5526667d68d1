"""The stage rows the CLI-level reliability tests share (``test_kill_resume.py``, ``test_reshard.py``) and
their uninterrupted runs, made once per test session on 8 fake devices (the ``uninterrupted`` fixture of
``conftest.py``): the kill test compares its killed-and-restarted runs with them, the reshard test resumes
copies of them on 1 and 4 devices.

Each row of :data:`STAGES` is ``(stage, config file, --set values)``; ``{sft}`` / ``{rm}`` in a value is
replaced by the stage checkpoint of the uninterrupted SFT / RM run (the bases of the later stages). Add a
stage by adding a row with tiny step counts, ``checkpoint.every`` small enough for a few checkpoints and
extras named in :data:`EXTRAS` when its stage checkpoint carries pytrees beside the params; the
``train.log_every=1`` of :data:`COMMON` feeds the kill test's step trigger (it reads ``metrics.jsonl``).
"""

from __future__ import annotations

import os

import _chaos

COMMON = [
    "train.log_every=1",
    "train.progress=false",
    "train.tensorboard=false",
    "checkpoint.keep=2",
    "export.hf=false",
]
RL = [  # what the tiny RL rows share: 4 iterations of 8 prompts, short answers, the reward model
    "model.path={sft}",
    "reward.path={rm}",
    "train.iterations=4",
    "data.batch_size=8",
    "rollout.sampling.max_new_tokens=8",
    "samples.num=0",
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
    # PPO: critic from the RM, rewards by the RM through the running normaliser, adaptive KL controller,
    # an EMA of the policy (what the stage checkpoint exports)
    ("ppo", "configs/tiny/ppo.yaml", RL + ["ppo.epochs=1", "ppo.ema_decay=0.5", "checkpoint.every=2"]),
    (
        "grpo",
        "configs/tiny/grpo.yaml",
        RL + ["rollout.sampling.n=2", "grpo.num_iterations=1", "checkpoint.every=2"],
    ),
    # RLOO: the GRPO stage's code with its own config (leave-one-out baselines, the KL in the reward)
    (
        "rloo",
        "configs/tiny/rloo.yaml",
        RL + ["rollout.sampling.n=2", "rloo.num_iterations=1", "checkpoint.every=2"],
    ),
]
ROWS = {stage: (config, sets) for stage, config, sets in STAGES}
EXTRAS = {"rm": ("reward_head",), "ppo": ("value_head",)}


def total_steps(sets: list[str]) -> int:
    """The row's optimizer steps (``optim.total_steps``) or RL iterations (``train.iterations``)."""
    key = next(s for s in sets if s.startswith(("optim.total_steps=", "train.iterations=")))
    return int(key.split("=")[1])


class Uninterrupted:
    """The uninterrupted run of each row, made on first use (its bases first) under ``root``; under
    pytest-xdist ``root`` is shared by the workers and each run is made once, behind a file lock."""

    def __init__(self, root):
        self.root = root
        # restarts load their compiled steps (as users' runs do); the session's cache (tests/conftest.py)
        # when it is on, so these runs also share programs with the other tests' runs
        self.cache = os.environ.get("JAXRLHF_TEST_SESSION_CACHE") or str(root / "jax_cache")
        self.shared = [f"tokenizer.cache_dir={root / 'tok'}", f"data.cache_dir={root / 'data'}"]
        self.dirs: dict[str, str] = {}

    def subst(self, sets: list[str]) -> list[str]:
        """``sets`` with ``{sft}`` / ``{rm}`` replaced by those runs' stage checkpoints (made if needed)."""
        out = []
        for s in sets:
            for base in ("sft", "rm"):
                if "{" + base + "}" in s:
                    s = s.replace("{" + base + "}", os.path.join(self.run_dir(base), "stage"))
            out.append(s)
        return out

    def sets(self, stage: str, out: str) -> list[str]:
        """Every ``--set`` of ``stage``'s command writing to ``out``."""
        return self.subst(ROWS[stage][1]) + COMMON + self.shared + [f"output_dir={out}"]

    def command(self, stage: str, out: str) -> list[str]:
        return _chaos.command(stage, os.path.join(_chaos.ROOT, ROWS[stage][0]), self.sets(stage, out))

    def run_dir(self, stage: str) -> str:
        """The uninterrupted run directory of ``stage`` (run now if it was not yet)."""
        if stage not in self.dirs:
            from filelock import FileLock

            out = str(self.root / stage)
            cmd = self.command(stage, out)  # its bases first, outside this stage's lock
            done = self.root / f"{stage}.done"
            with FileLock(str(self.root / f"{stage}.lock")):
                if not done.exists():
                    ref = _chaos.run(cmd, out, str(self.root / f"{stage}.log"), self.cache)
                    assert ref.returncode == 0, ref.log[-4000:]
                    done.write_text("ok")
            self.dirs[stage] = out
        return self.dirs[stage]
