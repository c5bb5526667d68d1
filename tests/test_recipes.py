"""The seed-model recipes in ``configs/`` at full size, without weights or network.

Every YAML file under ``configs/`` (except the bundled ``configs/tiny/`` task, covered by the stage tests)
names in its header the hardware it is written for, one line per target, each the command to run there::

    #   8xH100:  jaxrlhf sft --config configs/llama2_7b/sft.yaml
    #   v4-32:   jaxrlhf sft --config configs/llama2_7b/sft.yaml --set model.remat=full \\
    #               --set optim.grad_accum=8

For every such line (targets in ``_recipe_memory.TARGETS``: v5e-8, v4-32, 8xH100, 1xH100) the tests check:

- the file plus the line's ``--set`` overrides loads with the stage's config class (``config.load_config``:
  every key the recipe sets is a field of the stage config, every value has its type);
- the model is known without a download: ``model.path`` is a hub id of ``models.known_specs`` or the
  ``runs/<name>/stage`` of another recipe here (followed to its hub id), ``reward.path`` names an RM recipe;
- the parameters, built abstractly at full size (``jax.eval_shape`` over ``models.init_params``; LoRA
  adapters over ``lora.init``), split over an ``AbstractMesh`` of the target's device count by the logical
  axis rules with every sharded dimension dividing its mesh axes; batches divide into micro-batches, hosts
  and the batch-sharded devices;
- the per-device memory estimate (``_recipe_memory.estimate``; its docstring states the formula) fits in 90%
  of the target's HBM.
"""

from __future__ import annotations

import functools
import pathlib
import re
import shlex

import pytest
import yaml

from jaxrlhf.config import load_config
from jaxrlhf.models.known_specs import HF_CONFIGS
from jaxrlhf.stages.dpo import DPOConfig
from jaxrlhf.stages.ppo import PPOConfig
from jaxrlhf.stages.rm import RMConfig
from jaxrlhf.stages.sft import SFTConfig
from tests import _recipe_memory as mem

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
STAGES = {"sft": SFTConfig, "rm": RMConfig, "ppo": PPOConfig, "dpo": DPOConfig}
HARDWARE = re.compile(
    r"^#\s+(?P<target>[\w-]+):\s+jaxrlhf (?P<stage>\w+) --config (?P<path>\S+)(?P<rest>.*)$"
)
RUN_STAGE = re.compile(r"runs/(?P<name>[^/]+)/stage")

RECIPES = sorted(
    p.relative_to(ROOT).as_posix()
    for p in CONFIGS.rglob("*.yaml")
    if p.relative_to(CONFIGS).parts[0] != "tiny"
)


def _hardware_lines(rel: str) -> list[tuple[str, str, str, list[str]]]:
    """``(target, stage, config path, overrides)`` of each hardware line in the file's header (a line
    ending in a backslash continues on the next comment line)."""
    lines, out = [], []
    for line in (ROOT / rel).read_text().splitlines():
        if lines and lines[-1].endswith("\\") and line.startswith("#"):
            lines[-1] = lines[-1][:-1] + line[1:]
        else:
            lines.append(line)
    for line in lines:
        m = HARDWARE.match(line)
        if m:
            words = shlex.split(m["rest"])
            assert words[::2] == ["--set"] * len(words[::2]), f"{rel}: {line!r}: expected --set k=v pairs"
            out.append((m["target"], m["stage"], m["path"], words[1::2]))
    return out


CASES = [(rel, target, tuple(sets)) for rel in RECIPES for target, _, _, sets in _hardware_lines(rel)]


def _stage_of(rel: str) -> str:
    return pathlib.PurePosixPath(rel).name.split("_")[0].split(".")[0]


@functools.cache
def _load(rel: str, overrides: tuple[str, ...] = ()):
    return load_config(STAGES[_stage_of(rel)], ROOT / rel, list(overrides))


BY_NAME = {yaml.safe_load((ROOT / rel).read_text())["name"]: rel for rel in RECIPES}


def _upstream(path: str | None, what: str, rel: str) -> str:
    """The recipe whose run writes ``path`` (``runs/<name>/stage``)."""
    m = RUN_STAGE.fullmatch(path or "")
    assert m, f"{rel}: {what} {path!r} is neither a known hub id nor runs/<recipe name>/stage"
    assert m["name"] in BY_NAME, f"{rel}: {what} {path!r}: no recipe in configs/ has name {m['name']!r}"
    return BY_NAME[m["name"]]


def _hub_id(rel: str) -> str:
    """Follow ``model.path`` through previous stages' run directories to the hub id they start from."""
    seen = [rel]
    path = _load(rel).model.path
    while path not in HF_CONFIGS:
        up = _upstream(path, "model.path", seen[-1])
        assert up not in seen, f"{rel}: model.path chain loops: {seen + [up]}"
        seen.append(up)
        path = _load(up).model.path
    return path


def test_every_recipe_names_its_hardware():
    assert len(RECIPES) >= 60, RECIPES
    for rel in RECIPES:
        lines = _hardware_lines(rel)
        assert lines, f"{rel}: no hardware line ('#   8xH100:  jaxrlhf <stage> --config {rel} ...')"
        for target, stage, path, _ in lines:
            assert target in mem.TARGETS, f"{rel}: unknown target {target!r} (known: {sorted(mem.TARGETS)})"
            assert stage == _stage_of(rel), f"{rel}: the {target} line runs 'jaxrlhf {stage}'"
            assert path == rel, f"{rel}: the {target} line names --config {path}"


@pytest.mark.parametrize("rel", RECIPES)
def test_recipe_chain(rel):
    """Models come from a known hub id, directly or through the run directory of a recipe here; PPO's reward
    model is an RM recipe of the same model."""
    cfg, hub = _load(rel), _hub_id(rel)
    assert hub in HF_CONFIGS
    if _stage_of(rel) == "ppo":
        rm = _upstream(cfg.reward.path, "reward.path", rel)
        assert _stage_of(rm) == "rm", f"{rel}: reward.path names {rm}, not an RM recipe"
        assert _hub_id(rm) == hub, f"{rel}: the reward model ({_hub_id(rm)}) is not a {hub} model"


def _batch_problems(stage: str, cfg, target: mem.Target, mesh) -> list[str]:
    shards, d = mem.batch_shards(mesh), cfg.data
    out = []
    if d.batch_size % target.hosts:
        out.append(f"data.batch_size {d.batch_size} does not split over {target.hosts} hosts")
    if stage == "ppo":
        rows = d.batch_size * cfg.rollout.sampling.n
        k = cfg.ppo.num_minibatches * cfg.ppo.grad_accum
        if rows % shards:
            out.append(f"{rows} rollout rows do not split over data * fsdp = {shards} devices")
        if rows % k or (rows // k) % shards:
            out.append(
                f"{rows} rows / (num_minibatches * grad_accum = {k}) do not split over {shards} devices"
            )
    else:
        k = cfg.optim.grad_accum
        if d.batch_size % k or (d.batch_size // k) % shards:
            out.append(f"batch {d.batch_size} / grad_accum {k} does not split over {shards} devices")
        ref = getattr(cfg.train, "reference_batch_size", None)
        if ref is not None and ref % shards:
            out.append(f"train.reference_batch_size {ref} does not split over {shards} devices")
    return out


@pytest.mark.parametrize(("rel", "target", "overrides"), CASES, ids=[f"{r}-{t}" for r, t, _ in CASES])
def test_recipe_shards_and_fits(rel, target, overrides):
    """The hardware line's config on an abstract mesh of the target's devices: no parameter or adapter
    dimension left replicated, batches that split, and the memory estimate within 90% of HBM."""
    problems = _problems(rel, target, overrides)
    assert not problems, "\n".join(problems)


def _problems(rel: str, target: str, overrides: tuple[str, ...] = ()) -> list[str]:
    stage, cfg = _stage_of(rel), _load(rel, overrides)
    hub, hw = _hub_id(rel), mem.TARGETS[target]
    mesh = mem.abstract_mesh(cfg.train.mesh, hw.devices)
    where = f"{rel} on {target} (mesh {dict(mesh.shape)})"
    lcfgs = [None, cfg.lora, getattr(getattr(cfg, "critic", None), "lora", None)]
    out = [
        f"{where}: replicated {d}"
        for lc in dict.fromkeys(lcfgs)
        for d in mem.unsharded(hub, cfg.model.dtype, lc, mesh)
    ]
    out += [f"{where}: {p}" for p in _batch_problems(stage, cfg, hw, mesh)]
    if getattr(getattr(cfg, "samples", None), "num", 0) > 32:
        out.append(f"{where}: samples.num > 32 (the estimate leaves samples out)")
    rm_cfg = _load(_upstream(cfg.reward.path, "reward.path", rel)) if stage == "ppo" else None
    terms = mem.estimate(stage, cfg, hub, mesh, hw, rm_cfg=rm_cfg)
    if sum(terms.values()) > mem.HEADROOM * hw.hbm:
        out.append(f"{where} does not fit:\n{mem.report(terms, hw.hbm)}")
    return out


def test_the_checks_refuse_what_does_not_fit_or_split():
    # full fine-tuning of 8B with f32 master weights + AdamW needs ~22 bytes / parameter: not one H100
    assert any("does not fit" in p for p in _problems("configs/llama3_8b/sft.yaml", "1xH100"))
    # 20B on eight 16 GiB chips
    assert any("does not fit" in p for p in _problems("configs/flan_ul2/sft.yaml", "v5e-8"))
    # 128 rows in 128 micro-batches: one row cannot split over 8 devices
    split = _problems("configs/llama2_7b/sft.yaml", "8xH100", ("optim.grad_accum=128",))
    assert any("does not split over 8 devices" in p for p in split), split
    # a mesh axis of 3 does not divide Llama's 4096-wide embeddings (12 GPUs: data 4 x fsdp 3)
    mesh = mem.abstract_mesh(_load("configs/llama2_7b/sft.yaml", ("train.mesh.data=4",)).train.mesh, 12)
    assert mem.unsharded("meta-llama/Llama-2-7b-hf", "float32", None, mesh)
