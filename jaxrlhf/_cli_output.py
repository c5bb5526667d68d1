"""What the ``jaxrlhf`` command does around a stage's ``run(config)``: a quiet console, user errors as one
message (exit 2), a run that stopped itself (divergence guard, RL KL ceiling) as one message naming the last
good checkpoint (exit 3), interrupts as exit 130, preemption (SIGTERM) as exit 143, no half-made run
directory after a failure, and at the end a short summary of what the stage achieved with the next command
to run."""

from __future__ import annotations

import logging
import os
import sys
import traceback
from typing import Any

from jaxrlhf.config import ConfigError

logger = logging.getLogger("jaxrlhf")
PREEMPTED = 143  # 128 + SIGTERM: a checkpoint was saved (on several processes: at the same step)

# third-party noise silenced below --log-level debug (set before the libraries read them)
_QUIET_ENV = {
    "TF_CPP_MIN_LOG_LEVEL": "3",  # XLA / TSL C++ logging
    "TPU_MIN_LOG_LEVEL": "3",  # libtpu
    "TPU_STDERR_LOG_LEVEL": "3",
    "GRPC_VERBOSITY": "ERROR",
    "TRANSFORMERS_VERBOSITY": "error",  # "PyTorch was not found ..." and advisory warnings
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",  # datasets' map / filter progress bars
}
_QUIET_LOGGERS = ("jax._src.xla_bridge", "datasets", "transformers", "absl", "orbax")


def quiet() -> None:
    """Silence libtpu, XLA, transformers and ``datasets`` (env vars + loggers; user-set values win)."""
    for k, v in _QUIET_ENV.items():
        os.environ.setdefault(k, v)
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    if "datasets" in sys.modules:  # already imported: its progress-bar switch is read at call time too
        try:
            sys.modules["datasets"].disable_progress_bars()
        except AttributeError:
            pass
    if "transformers" in sys.modules:
        try:
            sys.modules["transformers"].utils.logging.set_verbosity_error()
        except AttributeError:
            pass


def _user_errors() -> tuple[type[BaseException], ...]:
    from jaxrlhf.data.errors import DataError

    return (ConfigError, DataError, FileNotFoundError)


STOPPED = 3  # the run stopped itself: its checkpoints are kept, the message says what to change


def _stopped_errors() -> tuple[type[BaseException], ...]:
    from jaxrlhf.stages._rl_loop import KLCeilingError
    from jaxrlhf.train.loop import DivergenceError

    return (DivergenceError, KLCeilingError)


def _looks_local(path: str) -> bool:
    """A path meant on this machine (not a hub id such as ``meta-llama/Llama-2-7b-hf``)."""
    if path.startswith(("/", ".", "~", "tiny:")):
        return True
    head = path.split("/", 1)[0]
    return path.count("/") != 1 or os.path.isdir(head)


def check_paths(config: Any) -> None:
    """The model / reward paths a config names exist (hub ids aside): one clear error otherwise."""
    from jaxrlhf.stages.common import resolve_path

    checks = [("model.path", getattr(getattr(config, "model", None), "path", None))]
    checks.append(("reward.path", getattr(getattr(config, "reward", None), "path", None)))
    if type(config).__name__ == "PipelineConfig":
        sft = config.stage_config("sft")
        checks = [("sft.model.path", sft.model.path)]
    for key, path in checks:
        if isinstance(path, str) and _looks_local(path) and not os.path.exists(resolve_path(path)):
            hint = " (run the stage that writes it first)" if "/stage" in path else ""
            raise ConfigError(f"{key}: {path} does not exist{hint}")


def tensorboard_note(config: Any) -> None:
    """Say once why TensorBoard logging is off when the config asks for it but it cannot work."""
    wants = getattr(getattr(config, "train", None), "tensorboard", None)
    if type(config).__name__ == "PipelineConfig":
        wants = True
    if not wants:
        return
    try:
        from tensorboard.summary import Writer  # noqa: F401
    except Exception as e:  # not installed, or an incompatible build
        logger.warning(
            "TensorBoard logging is off (%s: %s); metrics go to metrics.jsonl. "
            "pip install tensorboard (or jaxrlhf[tensorboard]) to turn it on",
            type(e).__name__,
            e,
        )


def _run_dir_of(config: Any) -> str:
    if type(config).__name__ == "PipelineConfig":
        return config.out
    return os.path.abspath(config.output_dir or os.path.join("runs", config.name))


def run_stage(stage: str, run, config: Any, *, debug: bool) -> int:
    """``run(config)`` with the exit-status contract (module docstring); prints the end-of-stage summary."""
    import signal

    from jaxrlhf import train
    from jaxrlhf.stages.pipeline import remove_half_made_run_dir

    out = _run_dir_of(config)
    existed = os.path.isdir(out)
    try:
        with train.preemption_guard():  # SIGTERM outside a training loop: exit 143 at once
            result = run(config)
    except train.Preempted:
        print(f"\njaxrlhf {stage}: preempted (SIGTERM); rerun the same command to resume", file=sys.stderr)
        return PREEMPTED
    except KeyboardInterrupt:
        print(f"\njaxrlhf {stage}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except _user_errors() as e:
        remove_half_made_run_dir(out, existed)
        if debug:
            raise
        print(f"jaxrlhf {stage}: {e}", file=sys.stderr)
        return 2
    except _stopped_errors() as e:
        if debug:
            raise
        print(f"jaxrlhf {stage}: stopped: {e}", file=sys.stderr)
        return STOPPED
    except BaseException:
        remove_half_made_run_dir(out, existed)
        raise
    if not getattr(result, "stage_dir", "x"):
        preempted = train.last_stop_signal() == signal.SIGTERM
        print(
            f"jaxrlhf {stage}: {'preempted (SIGTERM)' if preempted else 'interrupted'}; checkpoint saved in "
            f"{out}: rerun the same command to resume",
            file=sys.stderr,
        )
        return PREEMPTED if preempted else 130
    try:
        print(summary(stage, result, config))
    except Exception:  # the summary must never turn a finished run into a failure
        logger.debug("no summary: %s", traceback.format_exc())
    return 0


def _fmt(metrics: dict, keys: tuple[str, ...]) -> str:
    return ", ".join(f"{k} {metrics[k]:.4f}" for k in keys if isinstance(metrics.get(k), (int, float)))


def summary(stage: str, result: Any, config: Any) -> str:
    """A few lines: what the stage achieved, where it is, and the next command."""
    stage_dir = result.stage_dir
    ev = getattr(result, "eval_metrics", {}) or {}
    samples = getattr(result, "samples", {}) or {}
    gen = f"jaxrlhf generate --checkpoint {stage_dir} --prompt 'What is 2+3?' --temperature 0"
    lines = [f"== {stage} done: {result.run_dir}"]
    if stage == "pipeline":
        from jaxrlhf.stages import report

        lines += [report.format_summary(result.summary), f"report: {result.report_path}"]
        lines.append(f"next: {gen}")
        return "\n".join(lines)
    got = {
        "sft": _fmt(ev, ("loss", "accuracy", "ppl")),
        "rm": _fmt(ev, ("accuracy", "margin", "loss")),
        "dpo": _fmt(ev, ("rewards/accuracies", "rewards/margins", "loss")),
    }.get(stage) or _fmt(getattr(result, "train_metrics", {}) or {}, tuple(sorted(ev))[:4])
    if got:
        lines.append(f"held-out: {got}")
    if "rule_score" in samples:
        lines.append(f"samples: rule score {samples['rule_score']:.4f} ({result.run_dir}/samples.jsonl)")
    lines.append(f"stage checkpoint: {stage_dir}")
    nxt = {
        "sft": [
            f"jaxrlhf rm --config configs/tiny/rm.yaml --set model.path={stage_dir}",
            f"jaxrlhf dpo --config configs/tiny/dpo.yaml --set model.path={stage_dir}",
            gen,
        ],
        "rm": [
            f"jaxrlhf ppo --config configs/tiny/ppo.yaml --set reward.path={stage_dir}",
            f"jaxrlhf score --checkpoint {stage_dir} --pairs pairs.jsonl",
        ],
    }.get(stage, [gen, f"jaxrlhf export --checkpoint {stage_dir} --out {result.run_dir}/hf"])
    lines.append("next: " + "\n      ".join(nxt))
    return "\n".join(lines)
