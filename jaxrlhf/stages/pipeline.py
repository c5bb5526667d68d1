"""The whole recipe in one command: ``jaxrlhf pipeline --config configs/tiny/pipeline.yaml``.

``method`` picks the chain of stages, each a normal stage run (its ``run(config)``) in its own directory
under the pipeline's ``output_dir`` (default ``runs/<name>/``), each reading the previous stage's checkpoint
by path::

    method=ppo   sft -> rm -> ppo     runs/<name>/{sft,rm,ppo}/    (ppo: model.path = sft/stage,
    method=grpo  sft -> rm -> grpo    runs/<name>/{sft,rm,grpo}/          reward.path = rm/stage)
    method=rloo  sft -> rm -> rloo    runs/<name>/{sft,rm,rloo}/          (as grpo)
    method=dpo   sft -> dpo           runs/<name>/{sft,dpo}/       (dpo: model.path = sft/stage)

An RL section that sets ``reward.path: null`` (a Python reward alone, ``reward.function``) skips the RM.

Each stage section (``sft``, ``rm``, ``ppo``, ``dpo``, ``grpo``, ``rloo``) holds that stage's own config keys
(checked against its config class: unknown keys are errors), optionally on top of a stage YAML named by
``from`` (``sft: {from: configs/tiny/sft.yaml, optim: {total_steps: 200}}``). The pipeline sets each
stage's ``name``, ``output_dir`` and the paths that chain the stages; a section that sets them itself is
refused. ``samples`` (optional) replaces the ``samples`` section of the SFT and the final stage, so both
answer the same prompts with the same sampling settings (the report compares them side by side).

A stage whose checkpoint is complete (``stage/stage.json`` at the configured number of steps, made with the
same config) is skipped on a rerun; an interrupted one resumes from its checkpoints. At the end
:mod:`jaxrlhf.stages.report` writes ``runs/<name>/report.md`` (+ PNG plots) and the console summary;
``pipeline.json`` records the time of each stage.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import shutil
import time
from typing import Any, Literal, NamedTuple

from jaxrlhf.config import ConfigError, dump_yaml, from_dict, read_yaml, to_dict
from jaxrlhf.stages.samples import SampleConfig

logger = logging.getLogger("jaxrlhf.pipeline")

__all__ = [
    "CHAINS",
    "STAGE_CLASSES",
    "PipelineConfig",
    "PipelineResult",
    "StageOutcome",
    "is_finished",
    "remove_half_made_run_dir",
    "run",
]

# stage -> (module, config class)
STAGE_CLASSES: dict[str, tuple[str, str]] = {
    "sft": ("jaxrlhf.stages.sft", "SFTConfig"),
    "rm": ("jaxrlhf.stages.rm", "RMConfig"),
    "ppo": ("jaxrlhf.stages.ppo", "PPOConfig"),
    "dpo": ("jaxrlhf.stages.dpo", "DPOConfig"),
    "grpo": ("jaxrlhf.stages.grpo", "GRPOConfig"),
    "rloo": ("jaxrlhf.stages.rloo", "RLOOConfig"),
}
CHAINS: dict[str, tuple[str, ...]] = {
    "ppo": ("sft", "rm", "ppo"),
    "dpo": ("sft", "dpo"),
    "grpo": ("sft", "rm", "grpo"),
    "rloo": ("sft", "rm", "rloo"),
}
_RL = ("ppo", "grpo", "rloo")
_SET_BY_PIPELINE = ("name", "output_dir")
# what a failed run may leave in a run directory it created; such a directory is removed
_HALF_MADE = {"config.yaml", "run.json", "tokenizer", "cache"}


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """``name``: the run's name (stage runs are ``<name>-<stage>``); ``output_dir``: default ``runs/<name>``;
    ``method``: ``ppo`` (SFT -> RM -> PPO), ``dpo`` (SFT -> DPO), ``grpo`` (SFT -> RM -> GRPO) or
    ``rloo`` (SFT -> RM -> RLOO);
    ``samples``: the sample settings of the SFT and the final stage (null: each section's own);
    ``sft`` / ``rm`` / ``ppo`` / ``dpo`` / ``grpo`` / ``rloo``: that stage's config keys (``from``: a stage
    YAML that the keys override); a section the method does not run may be left out."""

    name: str = "pipeline"
    output_dir: str | None = None
    method: Literal["ppo", "dpo", "grpo", "rloo"] = "ppo"
    samples: SampleConfig | None = None
    sft: dict[str, Any] | None = None
    rm: dict[str, Any] | None = None
    ppo: dict[str, Any] | None = None
    dpo: dict[str, Any] | None = None
    grpo: dict[str, Any] | None = None
    rloo: dict[str, Any] | None = None

    def __post_init__(self):
        for stage in self.chain():
            if getattr(self, stage) is None:
                raise ConfigError(f"method={self.method} runs the {stage!r} stage: add a '{stage}' section")
        for stage in STAGE_CLASSES:  # every section given is checked (its module permitting)
            if getattr(self, stage) is not None and (stage in self.chain() or _available(stage)):
                self.stage_config(stage)

    @property
    def out(self) -> str:
        return os.path.abspath(self.output_dir or os.path.join("runs", self.name))

    def chain(self) -> tuple[str, ...]:
        """The stages ``method`` runs, in order (an RL section with ``reward.path: null`` skips the RM)."""
        stages = CHAINS[self.method]
        last = stages[-1]
        section = getattr(self, last) or {}
        if last in _RL and "path" in (section.get("reward") or {}) and section["reward"]["path"] is None:
            stages = tuple(s for s in stages if s != "rm")
        return stages

    def stage_dir(self, stage: str) -> str:
        return os.path.join(self.out, stage)

    def stage_config(self, stage: str) -> Any:
        """The stage's config object: its ``from`` YAML, the section's keys, then the pipeline's wiring."""
        section = dict(getattr(self, stage) or {})
        src = f"pipeline section '{stage}'"
        base_path = section.pop("from", None)
        for key in _SET_BY_PIPELINE:
            if key in section:
                raise ConfigError(f"{src}: '{stage}.{key}' is set by the pipeline ({self.stage_dir(stage)})")
        raw = _merge(read_yaml(_find(base_path)), section) if base_path else section
        raw = {**raw, "name": f"{self.name}-{stage}", "output_dir": self.stage_dir(stage)}
        chain = self.chain()
        if stage in chain and chain.index(stage) > 0:
            if "path" in (section.get("model") or {}):
                raise ConfigError(f"{src}: '{stage}.model.path' is set by the pipeline (the previous stage)")
            prev = "sft"  # every later stage starts from the SFT policy (the RM's backbone too)
            raw = _merge(raw, {"model": {"path": os.path.join(self.stage_dir(prev), "stage")}})
        if stage in _RL and "rm" in chain:
            if "path" in (section.get("reward") or {}):
                raise ConfigError(f"{src}: '{stage}.reward.path' is set by the pipeline (the RM stage)")
            raw = _merge(raw, {"reward": {"path": os.path.join(self.stage_dir("rm"), "stage")}})
        if self.samples is not None and stage in ("sft", chain[-1]):
            raw = {**raw, "samples": to_dict(self.samples)}
        cls_name = STAGE_CLASSES[stage][1]
        cls = getattr(_import(stage), cls_name)
        return from_dict(cls, raw, src + (f" (from {base_path})" if base_path else ""), prefix=f"{stage}.")


def _find(path: str) -> str:
    """A ``from`` path: as given (relative to the working directory), else relative to the checkout that
    holds this package (``configs/...`` of the repository), so the bundled recipes work from anywhere."""
    if os.path.isabs(path) or os.path.exists(path):
        return path
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    candidate = os.path.join(root, path)
    return candidate if os.path.exists(candidate) else path


def _available(stage: str) -> bool:
    try:
        _import(stage)
        return True
    except ConfigError:
        return False


def _import(stage: str):
    module = STAGE_CLASSES[stage][0]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
        raise ConfigError(
            f"the {stage!r} stage is not available in this version ({module} missing)"
        ) from None


def _merge(a: dict, b: dict) -> dict:
    """``b`` over ``a``, recursively for mappings on both sides."""
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class StageOutcome(NamedTuple):
    stage: str
    run_dir: str
    stage_dir: str  # "" when interrupted
    seconds: float  # wall time of this invocation (0 when skipped)
    skipped: bool
    result: Any  # the stage's result (None when skipped)


class PipelineResult(NamedTuple):
    run_dir: str
    stage_dir: str  # the final stage's checkpoint ("" when interrupted)
    stages: dict[str, StageOutcome]
    interrupted: bool
    report_path: str  # "" when interrupted
    summary: dict  # the numbers of the console summary (see report.summarize)


def _configured_steps(cfg: Any) -> int | None:
    # RL stages count iterations (train.iterations); the others optimizer steps
    for section, key in (("train", "iterations"), ("train", "total_steps"), ("optim", "total_steps")):
        value = getattr(getattr(cfg, section, None), key, None)
        if isinstance(value, int):
            return value
    return None


def is_finished(cfg: Any) -> bool:
    """The stage run of ``cfg`` is complete: its stage checkpoint records the configured number of steps and
    the same config (keys the runner lets change on resume aside)."""
    from jaxrlhf.stages import runner

    path = os.path.join(cfg.output_dir, "stage", "stage.json")
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        info = json.load(f)
    steps = _configured_steps(cfg)
    if steps is None or info.get("step") != steps:
        return False
    return not runner.config_changes(info.get("config", {}), to_dict(cfg))


def remove_half_made_run_dir(path: str, existed: bool) -> bool:
    """After a failed run: remove ``path`` if this run created it and it holds only what a start leaves
    (``config.yaml``, ``run.json``, the tiny tokenizer / data caches). Returns whether it was removed."""
    if existed or not os.path.isdir(path):
        return False
    if not set(os.listdir(path)) <= _HALF_MADE:
        return False
    shutil.rmtree(path, ignore_errors=True)
    logger.info("removed the half-made run directory %s", path)
    return True


def _record(out: str, chain: tuple[str, ...], times: dict) -> None:
    from jaxrlhf.stages import common

    common.write_json(os.path.join(out, "pipeline.json"), {"chain": list(chain), "stages": times})


def run(config: PipelineConfig) -> PipelineResult:
    """Run the chain of stages (module docstring), then write the report."""
    from jaxrlhf.stages import common, report

    out = config.out
    os.makedirs(out, exist_ok=True)
    if common.is_primary():
        dump_yaml(config, os.path.join(out, "config.yaml"))
    times_path = os.path.join(out, "pipeline.json")
    times: dict = {}
    if os.path.isfile(times_path):
        with open(times_path) as f:
            times = json.load(f).get("stages", {})
    outcomes: dict[str, StageOutcome] = {}
    chain = config.chain()
    logger.info("pipeline %s: %s under %s", config.name, " -> ".join(chain), out)
    for i, stage in enumerate(chain):
        cfg = config.stage_config(stage)
        stage_out = cfg.output_dir
        if is_finished(cfg):
            logger.info("[%d/%d] %s: already finished (%s), skipped", i + 1, len(chain), stage, stage_out)
            outcomes[stage] = StageOutcome(
                stage, stage_out, os.path.join(stage_out, "stage"), 0.0, True, None
            )
            continue
        logger.info("[%d/%d] %s -> %s", i + 1, len(chain), stage, stage_out)
        existed = os.path.isdir(stage_out)
        t0 = time.perf_counter()
        try:
            result = _import(stage).run(cfg)
        except BaseException:
            remove_half_made_run_dir(stage_out, existed)
            raise
        seconds = time.perf_counter() - t0
        prev = times.get(stage, {}).get("seconds", 0.0) if existed else 0.0
        times[stage] = {"seconds": prev + seconds, "finished": bool(result.stage_dir)}
        _record(out, chain, times)
        outcomes[stage] = StageOutcome(stage, result.run_dir, result.stage_dir, seconds, False, result)
        if not result.stage_dir:
            logger.warning("%s interrupted: rerun the same command to resume it", stage)
            return PipelineResult(out, "", outcomes, True, "", {})
    _record(out, chain, times)
    summary = report.write_report(out) if common.is_primary() else {}
    final = outcomes[chain[-1]].stage_dir
    return PipelineResult(out, final, outcomes, False, os.path.join(out, "report.md"), summary)
