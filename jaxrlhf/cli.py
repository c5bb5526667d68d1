"""The ``jaxrlhf`` command: ``jaxrlhf <stage> --config FILE.yaml --set key.path=value ...``.

Stages are modules of :mod:`jaxrlhf.stages` that define a frozen config dataclass and ``run(config)``
(see :data:`STAGES`); a stage whose module is not part of this installation is listed but refused with a
clear message. ``jaxrlhf <stage> --help`` lists every config key with its type, default and doc. The tools
``generate``, ``export``, ``score`` and ``report`` have their own arguments (``jaxrlhf <tool> --help``).

The console is quiet by default (no libtpu / transformers / ``datasets`` progress-bar noise);
``--log-level debug`` brings it back and shows tracebacks. Exit status: 0 done; 2 a user error (a config,
data, path or run-directory mismatch), reported in one message; 3 the run stopped itself (the divergence
guard or the RL KL ceiling: one message naming the last good checkpoint); 130 interrupted (Ctrl-C: the
checkpoint is saved and the same command resumes); 143 preempted (SIGTERM, as Cloud TPU VMs, spot
instances, Slurm and Kubernetes send it: the loop finishes its step and saves a checkpoint, on several
processes all at the same step, and the same command resumes; see RELIABILITY.md). A failed run leaves no
half-made run directory behind.

Multi-host (Cloud TPU pods, Slurm, SkyPilot, multi-node GPU): ``--distributed`` (or
``JAXRLHF_DISTRIBUTED=1``, or a set ``JAX_COORDINATOR_ADDRESS``) calls ``jax.distributed.initialize`` before
anything touches a device, with the coordinator / process count / id from ``JAX_COORDINATOR_ADDRESS``
(``host:port``), ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` and ``JAX_LOCAL_DEVICE_IDS``, else from SkyPilot or
torchrun-style variables, else detected by JAX (Cloud TPU VMs, Slurm, Open MPI): see
:mod:`jaxrlhf.distributed`. Launchers for each setup are in ``launch/`` (``launch/README.md``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

import yaml

from jaxrlhf import _cli_help, _cli_output, distributed
from jaxrlhf.config import ConfigError, load_config, to_dict

# stage name -> (module, config class names to look for, help)
STAGES: dict[str, tuple[str, tuple[str, ...], str]] = {
    "sft": ("jaxrlhf.stages.sft", ("SFTConfig",), "supervised fine-tuning on demonstrations"),
    "rm": ("jaxrlhf.stages.rm", ("RMConfig", "RewardConfig"), "reward model on comparisons"),
    "ppo": ("jaxrlhf.stages.ppo", ("PPOConfig",), "PPO against a reward model"),
    "dpo": ("jaxrlhf.stages.dpo", ("DPOConfig",), "direct preference optimization"),
    "grpo": ("jaxrlhf.stages.grpo", ("GRPOConfig",), "group-relative policy optimization"),
    "rloo": ("jaxrlhf.stages.rloo", ("RLOOConfig",), "REINFORCE leave-one-out"),
    "pipeline": ("jaxrlhf.stages.pipeline", ("PipelineConfig",), "SFT -> RM -> PPO (or DPO / GRPO) + report"),
}
# tools with their own argument parsers: name -> (module, function(argv) -> exit status, help)
TOOLS: dict[str, tuple[str, str, str]] = {
    "generate": ("jaxrlhf.stages.generate_cmd", "run_generate", "sample from a checkpoint or HF directory"),
    "export": ("jaxrlhf.stages.export_cmd", "run_export", "stage checkpoint -> HF dir or PEFT adapter dir"),
    "score": ("jaxrlhf.stages.score_cmd", "run_score", "score prompt/completion pairs with a reward model"),
    "report": ("jaxrlhf.stages.report", "main", "rewrite a pipeline run's report.md and plots"),
}
GENERATE_MODULE = TOOLS["generate"][0]
EXAMPLES = {
    "sft": "jaxrlhf sft --config configs/tiny/sft.yaml --set optim.total_steps=50 --set name=quick",
    "rm": "jaxrlhf rm --config configs/tiny/rm.yaml --set model.path=runs/tiny-sft/stage",
    "ppo": "jaxrlhf ppo --config configs/tiny/ppo.yaml",
    "dpo": "jaxrlhf dpo --config configs/tiny/dpo.yaml --set train.loss_type=ipo --set name=tiny-ipo",
    "grpo": "jaxrlhf grpo --config configs/tiny/grpo.yaml",
    "rloo": "jaxrlhf rloo --config configs/tiny/rloo.yaml",
    "pipeline": "jaxrlhf pipeline --config configs/tiny/pipeline.yaml --set method=dpo",
}
INTERRUPTED = 130
PREEMPTED = _cli_output.PREEMPTED  # 143 = 128 + SIGTERM
USER_ERROR = 2
EXIT_HELP = (
    "exit status: 0 done; 2 a user error (one message); 3 the run stopped itself (divergence, KL ceiling);\n"
    "  130 interrupted (Ctrl-C); 143 preempted (SIGTERM:\n"
    "  the step in progress finishes and a checkpoint is saved, on several processes all at the same step).\n"
    "  After 130 or 143 rerun the same command: it resumes from that checkpoint."
)

logger = logging.getLogger("jaxrlhf")


def _build_parser(help_for: str | None = None) -> argparse.ArgumentParser:
    """The parser; ``help_for``: the stage whose ``--help`` is asked (its key table is built, importing
    only that stage's module)."""
    parser = argparse.ArgumentParser(
        prog="jaxrlhf",
        description="The RLHF recipe in JAX: each stage reads a YAML config; --set overrides keys.",
        epilog=f"main command: jaxrlhf pipeline --config configs/tiny/pipeline.yaml\n\n{EXIT_HELP}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)
    for name, (_, _, help_text) in STAGES.items():
        p = sub.add_parser(
            name,
            help=help_text,
            description=f"jaxrlhf {name}: {help_text}\n\nexample:\n  {EXAMPLES[name]}\n\n{EXIT_HELP}",
            epilog=_config_help(name) if name == help_for else None,
            formatter_class=_cli_help.HelpFormatter,
        )
        p.add_argument("--config", "-c", help="YAML config file (default: the stage's defaults)")
        p.add_argument(
            "--set",
            dest="overrides",
            action="append",
            nargs="+",
            default=[],
            metavar="KEY=VALUE",
            help="override config keys, e.g. --set optim.lr=3e-4 optim.total_steps=100 (YAML values)",
        )
        p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
        _add_common(p)
    for name, (_, _, help_text) in TOOLS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() first (multi-host; implied by JAX_COORDINATOR_ADDRESS)",
    )
    p.add_argument(
        "--log-level",
        default=os.environ.get("JAXRLHF_LOG_LEVEL", "INFO"),
        help="info (default), debug (library logs, progress bars and tracebacks back on), warning",
    )


def _config_help(name: str) -> str:
    try:
        cls, _ = load_stage(name)
    except SystemExit as e:
        return str(e)
    return _cli_help.config_help(cls, name)


def wants_distributed(flag: bool, environ: dict[str, str] | None = None) -> bool:
    """:func:`jaxrlhf.distributed.wants_distributed`; a bad ``JAXRLHF_DISTRIBUTED`` exits with a message."""
    try:
        return distributed.wants_distributed(flag, environ)
    except distributed.DistributedEnvError as e:
        raise SystemExit(f"jaxrlhf: {e}") from None


def init_distributed(environ: dict[str, str] | None = None) -> None:
    """``jax.distributed.initialize`` with what the environment names (:mod:`jaxrlhf.distributed`: JAX_*,
    SkyPilot or torchrun variables; none: JAX detects Cloud TPU / Slurm / Open MPI); a malformed environment
    exits with a message naming the variable."""
    try:
        distributed.initialize(environ, force=True)
    except distributed.DistributedEnvError as e:
        raise SystemExit(f"jaxrlhf: {e}") from None


def load_stage(name: str) -> tuple[type, Any]:
    """``(config class, run function)`` of a stage; a clear error when the stage is not available."""
    module_name, class_names, _ = STAGES[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise
        raise SystemExit(
            f"jaxrlhf: stage {name!r} is not available in this version ({module_name} missing)"
        ) from None
    for cls_name in (*class_names, "Config"):
        if hasattr(module, cls_name):
            return getattr(module, cls_name), module.run
    raise SystemExit(f"jaxrlhf: {module_name} defines no config class ({', '.join(class_names)})")


def setup_logging(level: str) -> bool:
    """Console logging at ``level``; below debug the third-party noise is silenced. Returns ``debug``."""
    debug = str(level).upper() == "DEBUG"
    if not debug:
        _cli_output.quiet()
    logging.basicConfig(
        level=getattr(logging, str(level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    logging.getLogger("absl").setLevel(logging.DEBUG if debug else logging.WARNING)  # Orbax: every file
    return debug


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] and argv[0] in TOOLS:  # own parsers (argparse.REMAINDER cannot start with an option)
        return _run_tool(argv[0], argv[1:])
    asks_help = any(a in ("-h", "--help") for a in argv)
    args = _build_parser(argv[0] if argv and asks_help else None).parse_args(argv)
    debug = setup_logging(args.log_level)
    if wants_distributed(args.distributed):
        init_distributed()
    cls, run = load_stage(args.stage)
    overrides = [item for group in args.overrides for item in group]
    try:
        if args.stage == "pipeline":
            _check_pipeline_overrides(overrides)
        config = load_config(cls, args.config, overrides)
        _cli_output.check_paths(config)
    except ConfigError as e:
        if debug:
            raise
        print(f"jaxrlhf {args.stage}: {e}", file=sys.stderr)
        return USER_ERROR
    if args.print_config:
        yaml.safe_dump(to_dict(config), sys.stdout, sort_keys=False)
        return 0
    _cli_output.tensorboard_note(config)
    return _cli_output.run_stage(args.stage, run, config, debug=debug)


def _check_pipeline_overrides(overrides: Sequence[str]) -> None:
    """``--set sft.optim.lrr=1`` is checked against the SFT config (the pipeline's sections are mappings),
    so a misspelled key gets its did-you-mean naming the ``--set`` argument."""
    from jaxrlhf.config import check_key_path, parse_override
    from jaxrlhf.stages import pipeline

    for item in overrides:
        keys, _ = parse_override(item)
        if keys[0] not in pipeline.STAGE_CLASSES or len(keys) < 2 or keys[1] == "from":
            continue
        module_name, cls_name = pipeline.STAGE_CLASSES[keys[0]]
        try:
            cls = getattr(importlib.import_module(module_name), cls_name)
        except ModuleNotFoundError:
            continue
        try:
            check_key_path(cls, keys[1:], f"--set {item}")
        except ConfigError as e:
            msg = str(e).replace("unknown key '", f"unknown key '{keys[0]}.")
            raise ConfigError(msg.replace("did you mean '", f"did you mean '{keys[0]}.")) from None


def _run_tool(name: str, tool_args: list[str]) -> int:
    module_name, fn_name, _ = TOOLS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise
        raise SystemExit(
            f"jaxrlhf: {name!r} is not available in this version ({module_name} missing)"
        ) from None
    debug = "--log-level" in tool_args and "debug" in [a.lower() for a in tool_args]
    if not debug:
        _cli_output.quiet()
    try:
        result = getattr(module, fn_name)(tool_args)
    except SystemExit as e:  # a tool's user error, SystemExit("message"): one message, exit status 2
        if not isinstance(e.code, str):
            raise
        print(e.code, file=sys.stderr)
        return USER_ERROR
    return int(result) if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
