"""The ``jaxrlhf`` command: ``jaxrlhf <stage> --config FILE.yaml --set key.path=value ...``.

Stages are modules of :mod:`jaxrlhf.stages` that define a frozen config dataclass and ``run(config)``
(see :data:`STAGES`); a stage whose module is not part of this installation is listed but refused with a
clear message. ``jaxrlhf generate`` hands its arguments to ``jaxrlhf.stages.generate_cmd.run_generate``.

Multi-host (Cloud TPU pods, multi-node GPU): ``--distributed`` (or ``JAXRLHF_DISTRIBUTED=1``, or a set
``JAX_COORDINATOR_ADDRESS``) calls ``jax.distributed.initialize()`` before anything touches a device. On TPU
pods the coordinator, process count and id are detected; elsewhere they come from ``JAX_COORDINATOR_ADDRESS``
(``host:port``), ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``. See ``launch/tpu_pod.sh``.
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
    env = os.environ if environ is None else environ
    return (
        flag
        or env.get("JAXRLHF_DISTRIBUTED", "") in ("1", "true")
        or bool(env.get("JAX_COORDINATOR_ADDRESS"))
    )


def init_distributed(environ: dict[str, str] | None = None) -> None:
    """``jax.distributed.initialize`` with the coordinator / process count / id from the environment, if set
    (TPU pods and SLURM detect them when absent)."""
    import jax

    env = os.environ if environ is None else environ
    kwargs: dict[str, Any] = {}
    if env.get("JAX_COORDINATOR_ADDRESS"):
        kwargs["coordinator_address"] = env["JAX_COORDINATOR_ADDRESS"]
    if env.get("JAX_NUM_PROCESSES"):
        kwargs["num_processes"] = int(env["JAX_NUM_PROCESSES"])
    if env.get("JAX_PROCESS_ID"):
        kwargs["process_id"] = int(env["JAX_PROCESS_ID"])
    jax.distributed.initialize(**kwargs)
    logger.info(
        "jax.distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


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
