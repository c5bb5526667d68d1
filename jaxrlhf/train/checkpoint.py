"""Orbax checkpoints: a resumable train-state manager and the stage checkpoint handed to the next stage.

Train checkpoints (:class:`CheckpointManager`) — ``<dir>/<step>/{state/, loader/}``:
    ``state`` is the whole :class:`TrainState` (trainable params or adapters, frozen params, optimizer
    state, step, raw uint32 RNG key) as an Orbax pytree; ``loader`` is the data loader's ``state()`` (a small
    dict of ints) as JSON. Saves run asynchronously; Orbax writes each step under a temporary name and
    renames it when complete, so a crash mid-save leaves the earlier steps intact and the partial one is
    never listed. ``restore_latest(target, shardings)`` resumes from the newest complete step, placing
    arrays by ``shardings`` (which may describe a different mesh than the one that saved).

Stage checkpoints (:func:`save_stage` / :func:`load_stage`) — layout of docs/INTERNALS.md::

    <dir>/params/  <dir>/lora/ (optional)  <dir>/spec.json  <dir>/lora_config.json (optional)
    <dir>/tokenizer/ (HF tokenizer files incl. chat template)  <dir>/stage.json  <dir>/<extra>/ (pytrees)
    <dir>/<name>.json (json_extras)

The whole directory is written under ``<dir>.tmp-*`` and renamed into place (an existing one is moved
aside first and deleted last), so a crash never leaves a half-written stage checkpoint at ``<dir>``.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, SingleDeviceSharding

from jaxrlhf import sharding
from jaxrlhf.train.state import TrainState, abstract_state


class CheckpointManager:
    """Thin wrapper over ``orbax.checkpoint.CheckpointManager`` for :class:`TrainState` + loader state."""

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        save_interval_steps: int = 1000,
        max_to_keep: int | None = 3,
        async_save: bool = True,
    ):
        self.directory = os.path.abspath(os.fspath(directory))
        self.save_interval_steps = save_interval_steps
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_interval_steps,
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._mgr = ocp.CheckpointManager(self.directory, options=options)

    def should_save(self, step: int) -> bool:
        """True on multiples of ``save_interval_steps`` (Orbax alone would also save any first step)."""
        return step > 0 and step % self.save_interval_steps == 0

    def save(self, state: TrainState, loader_state: dict | None = None, *, force: bool = False) -> bool:
        """Save at ``int(state.step)`` if the interval says so (or ``force``); returns whether it saved."""
        step = int(jax.device_get(state.step))
        if not force and not self.should_save(step):
            return False
        if step in self._mgr.all_steps():
            return False
        items = {"state": ocp.args.StandardSave(state._asdict())}
        items["loader"] = ocp.args.JsonSave(dict(loader_state or {}))
        return self._mgr.save(step, args=ocp.args.Composite(**items), force=True)

    def all_steps(self) -> list[int]:
        return sorted(self._mgr.all_steps())

    def latest_step(self) -> int | None:
        return self._mgr.latest_step()

    def restore(
        self, step: int, target: TrainState, shardings: TrainState | None = None
    ) -> tuple[TrainState, dict]:
        """Restore ``step`` into the structure of ``target`` (arrays or ShapeDtypeStructs), placed by
        ``shardings`` when given (else by the target arrays' own shardings). Returns (state, loader_state)."""
        abstract = abstract_state(target, shardings)._asdict()
        out = self._mgr.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), loader=ocp.args.JsonRestore()),
        )
        return TrainState(**out["state"]), dict(out["loader"] or {})

    def restore_latest(
        self, target: TrainState, shardings: TrainState | None = None
    ) -> tuple[TrainState, dict | None]:
        """Resume from the newest complete checkpoint; ``(target, None)`` unchanged when there is none."""
        step = self.latest_step()
        if step is None:
            return target, None
        return self.restore(step, target, shardings)

    def wait(self) -> None:
        """Block until pending async saves are on disk."""
        self._mgr.wait_until_finished()

    def close(self) -> None:
        self._mgr.wait_until_finished()
        self._mgr.close()


# ---------------------------------------------------------------------------------------------- stage


@dataclasses.dataclass
class StageCheckpoint:
    """What one stage hands to the next (see module docstring for the layout)."""

    path: str
    spec: Any  # models.ModelSpec
    params: Any
    lora: Any = None
    lora_config: Any = None  # lora.LoraConfig
    tokenizer_dir: str | None = None  # <path>/tokenizer when saved
    stage_info: dict = dataclasses.field(default_factory=dict)
    extras: dict = dataclasses.field(default_factory=dict)  # name -> pytree or (json extras) dict


def _save_tree(path: str, tree: Any) -> None:
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(path, tree)
    ckptr.wait_until_finished()


def _restore_tree(path: str, shardings: Any = None, dtype: Any = None) -> Any:
    """Restore an Orbax pytree placed by ``shardings`` (None: first device), floats cast to ``dtype``."""
    ckptr = ocp.StandardCheckpointer()
    meta = ckptr.metadata(path)
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    dev = SingleDeviceSharding(jax.devices()[0])
    if shardings is None:
        shardings = jax.tree.map(lambda _: dev, tree)

    def target(m, s):
        dt = dtype if dtype is not None and jax.numpy.issubdtype(m.dtype, jax.numpy.floating) else m.dtype
        return jax.ShapeDtypeStruct(tuple(m.shape), dt, sharding=s)

    return ckptr.restore(path, jax.tree.map(target, tree, shardings))


def save_stage(
    directory: str | os.PathLike,
    spec: Any,
    params: Any,
    *,
    lora: Any = None,
    lora_config: Any = None,
    tokenizer_dir: str | os.PathLike | None = None,
    stage_info: dict | None = None,
    extras: dict[str, Any] | None = None,
    json_extras: dict[str, dict] | None = None,
) -> str:
    """Write a stage checkpoint atomically (temp dir, then rename); returns the final path."""
    final = os.path.abspath(os.fspath(directory))
    os.makedirs(os.path.dirname(final), exist_ok=True)
    tmp = f"{final}.tmp-{os.getpid()}-{time.time_ns()}"
    os.makedirs(tmp)
    _save_tree(os.path.join(tmp, "params"), params)
    if lora is not None:
        if lora_config is None:
            raise ValueError("save_stage: lora adapters given without lora_config")
        _save_tree(os.path.join(tmp, "lora"), lora)
        with open(os.path.join(tmp, "lora_config.json"), "w") as f:
            f.write(lora_config.to_json())
    with open(os.path.join(tmp, "spec.json"), "w") as f:
        f.write(spec.to_json())
    with open(os.path.join(tmp, "stage.json"), "w") as f:
        json.dump(dict(stage_info or {}), f, indent=2, sort_keys=True)
    if tokenizer_dir is not None:
        if not os.path.isdir(tokenizer_dir):
            raise FileNotFoundError(f"save_stage: tokenizer_dir {tokenizer_dir} is not a directory")
        shutil.copytree(tokenizer_dir, os.path.join(tmp, "tokenizer"))
    reserved = {"params", "lora", "tokenizer", "spec", "stage", "lora_config"}
    for name, tree in (extras or {}).items():
        if name in reserved or "/" in name:
            raise ValueError(f"save_stage: extra name {name!r} is reserved or not a plain name")
        _save_tree(os.path.join(tmp, name), tree)
    for name, obj in (json_extras or {}).items():
        if name in reserved or "/" in name:
            raise ValueError(f"save_stage: json extra name {name!r} is reserved or not a plain name")
        with open(os.path.join(tmp, f"{name}.json"), "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
    old = None
    if os.path.exists(final):
        old = f"{final}.old-{os.getpid()}-{time.time_ns()}"
        os.rename(final, old)
    os.rename(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _resolve_stage_dir(path: str) -> str:
    if os.path.isdir(path):
        return path
    # a crash between "move the old one aside" and "rename the new one in" leaves only <dir>.old-*
    olds = sorted(glob.glob(f"{path}.old-*"))
    if olds:
        return olds[-1]
    raise FileNotFoundError(f"{path}: no stage checkpoint here")


def load_stage(
    directory: str | os.PathLike, *, mesh: Mesh | None = None, dtype: Any = None, extras: tuple[str, ...] = ()
) -> StageCheckpoint:
    """Read a stage checkpoint. With ``mesh``, params (and adapters) are restored sharded by their logical
    axes; ``dtype`` casts floating params on restore; ``extras`` names the pytree extras to load (every
    ``*.json`` extra is always read)."""
    from jaxrlhf import lora as lora_lib
    from jaxrlhf import models

    path = _resolve_stage_dir(os.path.abspath(os.fspath(directory)))
    spec_file = os.path.join(path, "spec.json")
    if not os.path.isfile(spec_file):
        raise FileNotFoundError(f"{path}: not a stage checkpoint (no spec.json)")
    with open(spec_file) as f:
        spec = models.ModelSpec.from_json(f.read())
    p_sh = l_sh = None
    if mesh is not None:
        axes = models.param_axes(spec)
        p_sh = sharding.named_shardings(axes, mesh, models.abstract_params(spec))
    params = _restore_tree(os.path.join(path, "params"), p_sh, dtype)
    adapters = cfg = None
    if os.path.isdir(os.path.join(path, "lora")):
        with open(os.path.join(path, "lora_config.json")) as f:
            cfg = lora_lib.LoraConfig.from_json(f.read())
        if mesh is not None:
            meta = _restore_tree(os.path.join(path, "lora"))  # small: read once, then place
            l_sh = sharding.named_shardings(lora_lib.param_axes(models.param_axes(spec), meta), mesh, meta)
            adapters = jax.device_put(meta, l_sh)
        else:
            adapters = _restore_tree(os.path.join(path, "lora"))
    with open(os.path.join(path, "stage.json")) as f:
        info = json.load(f)
    loaded: dict[str, Any] = {}
    for name in extras:
        if not os.path.isdir(os.path.join(path, name)):
            raise FileNotFoundError(f"{path}: stage checkpoint has no extra {name!r}")
        loaded[name] = _restore_tree(os.path.join(path, name))
    for fn in sorted(glob.glob(os.path.join(path, "*.json"))):
        name = os.path.basename(fn)[:-5]
        if name not in ("spec", "stage", "lora_config"):
            with open(fn) as f:
                loaded[name] = json.load(f)
    tok = os.path.join(path, "tokenizer")
    tok_dir = tok if os.path.isdir(tok) else None
    return StageCheckpoint(path, spec, params, adapters, cfg, tok_dir, info, loaded)
