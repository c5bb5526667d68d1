"""The ``jaxrlhf`` command: ``jaxrlhf <stage> --config FILE.yaml --set key.path=value ...``.

Stages are modules of :mod:`jaxrlhf.stages` that define a frozen config dataclass and ``run(config)``
(see :data:`STAGES`); a stage whose module is not part of this installation is listed but refused with a
clear message. ``jaxrlhf generate`` hands its arguments to ``jaxrlhf.stages.generate_cmd.run_generate``.

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

from jaxrlhf import distributed
from jaxrlhf.config import ConfigError, load_config, to_dict

# stage name -> (module, config class names to look for, help)
STAGES: dict[str, tuple[str, tuple[str, ...], str]] = {
    "sft": ("jaxrlhf.stages.sft", ("SFTConfig",), "supervised fine-tuning on demonstrations"),
    "rm": ("jaxrlhf.stages.rm", ("RMConfig", "RewardConfig"), "reward model on comparisons"),
    "ppo": ("jaxrlhf.stages.ppo", ("PPOConfig",), "PPO against a reward model"),
    "dpo": ("jaxrlhf.stages.dpo", ("DPOConfig",), "direct preference optimization"),
    "grpo": ("jaxrlhf.stages.grpo", ("GRPOConfig",), "group-relative policy optimization"),
    "pipeline": ("jaxrlhf.stages.pipeline", ("PipelineConfig",), "SFT -> RM -> PPO in one command"),
}
GENERATE_MODULE = "jaxrlhf.stages.generate_cmd"

logger = logging.getLogger("jaxrlhf")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxrlhf",
        description="The RLHF recipe in JAX: each stage reads a YAML config; --set overrides keys.",
    )
    sub = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)
    for name, (_, _, help_text) in STAGES.items():
        p = sub.add_parser(name, help=help_text, description=f"jaxrlhf {name}: {help_text}")
        p.add_argument("--config", "-c", help="YAML config file (default: the stage's defaults)")
        p.add_argument(
            "--set",
            dest="overrides",
            action="append",
            nargs="+",
            default=[],
            metavar="KEY=VALUE",
            help="override a config key, e.g. --set optim.lr=3e-4 train.steps=100 (values are YAML scalars)",
        )
        p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
        _add_common(p)
    g = sub.add_parser(
        "generate",
        help="sample from a checkpoint or HF directory",
        add_help=False,
        description="jaxrlhf generate: arguments are those of jaxrlhf.stages.generate_cmd",
    )
    g.add_argument("generate_args", nargs=argparse.REMAINDER)
    return parser


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() first (multi-host; implied by JAX_COORDINATOR_ADDRESS)",
    )
    p.add_argument("--log-level", default=os.environ.get("JAXRLHF_LOG_LEVEL", "INFO"))


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


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["generate"]:  # its own parser (argparse.REMAINDER cannot start with an option)
        return _run_generate(argv[1:])
    args = _build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax logs every file it writes at INFO
    if wants_distributed(args.distributed):
        init_distributed()
    cls, run = load_stage(args.stage)
    overrides = [item for group in args.overrides for item in group]
    try:
        config = load_config(cls, args.config, overrides)
    except ConfigError as e:
        print(f"jaxrlhf {args.stage}: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        yaml.safe_dump(to_dict(config), sys.stdout, sort_keys=False)
        return 0
    run(config)
    return 0


def _run_generate(generate_args: list[str]) -> int:
    try:
        module = importlib.import_module(GENERATE_MODULE)
    except ModuleNotFoundError as e:
        if e.name != GENERATE_MODULE:
            raise
        raise SystemExit(
            f"jaxrlhf: 'generate' is not available in this version ({GENERATE_MODULE} missing)"
        ) from None
    result = module.run_generate(generate_args)
    return int(result) if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
