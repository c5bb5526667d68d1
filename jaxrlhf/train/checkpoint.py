"""Orbax checkpoints: a resumable train-state manager and the stage checkpoint handed to the next stage.

Train checkpoints (:class:`CheckpointManager`) — ``<dir>/<step>/{state/, meta/, loader/}``:
    ``state`` is any pytree (a :class:`~jaxrlhf.train.state.TrainState`, or an RL stage's NamedTuple of
    policy + critic + optimizer states + KL-controller / reward-normaliser state + RNG), saved as a flat
    mapping of its leaves; ``meta`` lists each leaf's tree path, shape and dtype (so a checkpoint that does
    not fit the run's model is reported by key before Orbax is asked to restore it); ``loader`` is the data
    loader's ``state()`` as JSON. The frozen base of a LoRA run is not part of the state, so train
    checkpoints hold adapters + optimizer state only. Saves run asynchronously; Orbax writes each step under
    a temporary name and renames it when complete, so a crash mid-save leaves the earlier steps intact and
    the partial one is never listed. ``restore_latest(target, shardings)`` resumes from the newest complete
    step, placing arrays by ``shardings`` (which may describe a different mesh than the one that saved).

Stage checkpoints (:func:`save_stage` / :func:`load_stage`) — layout of docs/INTERNALS.md::

    <dir>/params/ (or <dir>/base.json)  <dir>/lora/ (optional)  <dir>/spec.json  <dir>/lora_config.json
    <dir>/tokenizer/ (HF tokenizer files incl. chat template)  <dir>/stage.json  <dir>/<extra>/ (pytrees)
    <dir>/<name>.json (json_extras)

Under LoRA the frozen base need not be copied: ``base.json`` records where it came from (``path``: a HF
directory or another stage checkpoint, whose adapters are merged) and a content fingerprint
(:func:`weights_fingerprint`), checked when the stage is loaded.

The whole directory is written under ``<dir>.tmp`` (one name for all processes) and renamed into place by
process 0 (an existing one is moved aside first and deleted last), so a crash never leaves a half-written
stage checkpoint at ``<dir>``. On several processes every process writes its shards of the Orbax trees;
process 0 alone writes the JSON files and the tokenizer, between barriers.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import shutil
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from jaxrlhf import sharding
from jaxrlhf.train.state import abstract_state


class CheckpointCorruptError(ValueError):
    """A checkpoint that cannot be read (truncated, corrupt); names its directory and the ways out."""


class CheckpointMismatchError(ValueError):
    """A checkpoint whose tree or shapes do not fit the run's model / state; names the first differences."""


# ---------------------------------------------------------------------------------------------- processes


def is_primary() -> bool:
    return jax.process_index() == 0


def sync(name: str) -> None:
    """A barrier across processes (no-op on one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _default_sharding(mesh: Mesh | None):
    """Where arrays without an explicit sharding go: replicated on ``mesh``; else the first device on one
    process, replicated over all devices on several (``jax.devices()[0]`` is not addressable everywhere)."""
    if mesh is not None:
        return NamedSharding(mesh, PartitionSpec())
    if jax.process_count() == 1:
        return SingleDeviceSharding(jax.devices()[0])
    return NamedSharding(Mesh(np.asarray(jax.devices()), ("all",)), PartitionSpec())


# ---------------------------------------------------------------------------------------------- train state


def _flat(tree: Any) -> tuple[list[str], list[Any]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [jax.tree_util.keystr(p) for p, _ in leaves], [x for _, x in leaves]


def _describe(tree: Any) -> dict:
    paths, leaves = _flat(tree)
    return {
        "paths": paths,
        "shapes": [list(np.shape(x)) for x in leaves],
        "dtypes": [str(np.dtype(x.dtype)) for x in leaves],
    }


def _mismatch(saved: dict, wanted: dict, where: str) -> str | None:
    """One message naming up to five differing keys, or None when the trees fit."""
    s_paths = dict(zip(saved["paths"], saved["shapes"], strict=True))
    w_paths = dict(zip(wanted["paths"], wanted["shapes"], strict=True))
    problems = [f"{k}: missing from the checkpoint" for k in w_paths if k not in s_paths]
    problems += [f"{k}: in the checkpoint but not in this run" for k in s_paths if k not in w_paths]
    problems += [
        f"{k}: shape {tuple(s_paths[k])} in the checkpoint, {tuple(w)} in this run"
        for k, w in w_paths.items()
        if k in s_paths and list(s_paths[k]) != list(w)
    ]
    if not problems:
        return None
    more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
    return f"{where} does not fit this run's model/state: " + "; ".join(problems[:5]) + more


class CheckpointManager:
    """Thin wrapper over ``orbax.checkpoint.CheckpointManager`` for any pytree state + loader state."""

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
            cleanup_tmp_directories=True,  # partial checkpoints of a killed run are removed, never listed
        )
        self._mgr = ocp.CheckpointManager(self.directory, options=options)

    def should_save(self, step: int) -> bool:
        """True on multiples of ``save_interval_steps`` (Orbax alone would also save any first step)."""
        return step > 0 and step % self.save_interval_steps == 0

    def save(self, state: Any, loader_state: dict | None = None, *, force: bool = False) -> bool:
        """Save at ``int(state.step)`` if the interval says so (or ``force``); returns whether it saved."""
        step = int(jax.device_get(state.step))
        if not force and not self.should_save(step):
            return False
        if step in self._mgr.all_steps():
            return False
        _, leaves = _flat(state)
        items = {
            "state": ocp.args.StandardSave({f"{i:06d}": x for i, x in enumerate(leaves)}),
            "meta": ocp.args.JsonSave(_describe(state)),
            "loader": ocp.args.JsonSave(dict(loader_state or {})),
        }
        return self._mgr.save(step, args=ocp.args.Composite(**items), force=True)

    def all_steps(self) -> list[int]:
        return sorted(self._mgr.all_steps())

    def latest_step(self) -> int | None:
        return self._mgr.latest_step()

    def restore(self, step: int, target: Any, shardings: Any = None) -> tuple[Any, dict]:
        """Restore ``step`` into the structure of ``target`` (arrays or ShapeDtypeStructs), placed by
        ``shardings`` when given (else by the target arrays' own shardings). Returns (state, loader_state).

        Raises :class:`CheckpointMismatchError` naming the differing keys when the saved tree does not fit.
        """
        where = os.path.join(self.directory, str(step))
        try:
            meta = self._mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:
            raise self._corrupt(where, step, e) from e
        problem = _mismatch(meta, _describe(target), where)
        if problem:
            raise CheckpointMismatchError(problem)
        abstract = abstract_state(target, shardings)
        treedef = jax.tree.structure(abstract)
        flat = {f"{i:06d}": x for i, x in enumerate(jax.tree.leaves(abstract))}
        try:
            out = self._mgr.restore(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardRestore(flat), loader=ocp.args.JsonRestore()),
            )
        except Exception as e:
            raise self._corrupt(where, step, e) from e
        leaves = [out["state"][k] for k in sorted(flat)]
        return jax.tree.unflatten(treedef, leaves), dict(out["loader"] or {})

    def _corrupt(self, where: str, step: int, e: Exception) -> CheckpointCorruptError:
        others = [s for s in self.all_steps() if s != step]
        return CheckpointCorruptError(
            f"{where}: the checkpoint is truncated or corrupt ({type(e).__name__}: {str(e)[:200]}); delete "
            f"it to resume from {'step ' + str(others[-1]) if others else 'the start'}, or set "
            "checkpoint.resume=false to start over"
        )

    def restore_latest(self, target: Any, shardings: Any = None) -> tuple[Any, dict | None]:
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
    base: dict | None = None  # base.json: {"path", "fingerprint"} when the base was not copied
    adapter_sets: dict = dataclasses.field(default_factory=dict)  # name -> (adapters, LoraConfig)


def weights_fingerprint(path: str) -> str:
    """A content fingerprint of a weights directory: SHA-256 over every weight file's relative name, size
    and the SHA-256 of its first and last MiB. HF directories: ``*.safetensors`` / ``*.bin``; stage
    checkpoints: the files of ``params/`` and ``lora/`` (and ``base.json``, which names their own base).
    Cheap on a 70B checkpoint, and independent of the mesh the weights are later loaded on."""
    path = os.path.abspath(path)
    if os.path.isfile(os.path.join(path, "stage.json")):
        files = [
            f
            for sub in ("params", "lora")
            for f in glob.glob(os.path.join(path, sub, "**", "*"), recursive=True)
            if os.path.isfile(f)
        ]
        files += [os.path.join(path, "base.json")] if os.path.isfile(os.path.join(path, "base.json")) else []
    else:
        files = [
            f
            for pat in ("*.safetensors", "*.bin")
            for f in glob.glob(os.path.join(path, pat))
            if os.path.isfile(f)
        ]
    if not files:
        raise FileNotFoundError(f"{path}: no weight files to fingerprint")
    h = hashlib.sha256()
    for f in sorted(files):
        size = os.path.getsize(f)
        h.update(f"{os.path.relpath(f, path)}\0{size}\0".encode())
        with open(f, "rb") as fh:
            h.update(hashlib.sha256(fh.read(1 << 20)).digest())
            if size > 1 << 20:
                fh.seek(max(1 << 20, size - (1 << 20)))
                h.update(hashlib.sha256(fh.read()).digest())
    return h.hexdigest()


def _save_tree(path: str, tree: Any) -> None:
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(path, tree)
    ckptr.wait_until_finished()
    ckptr.close()


def _tree_metadata(path: str) -> Any:
    ckptr = ocp.StandardCheckpointer()
    try:
        meta = ckptr.metadata(path)
    except Exception as e:
        raise ValueError(f"{path}: not a readable Orbax tree ({type(e).__name__}: {str(e)[:300]})") from e
    tree = getattr(meta, "item_metadata", meta)
    return getattr(tree, "tree", tree)


def _read(path: str, parse) -> Any:
    """``parse(open file)``; a missing, truncated or malformed file is an error naming it."""
    try:
        with open(path) as f:
            return parse(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing from the stage checkpoint") from None
    except Exception as e:
        raise ValueError(
            f"{path}: unreadable ({type(e).__name__}: {e}); the stage checkpoint is damaged"
        ) from e


def _restore_tree(path: str, shardings: Any = None, dtype: Any = None, mesh: Mesh | None = None) -> Any:
    """Restore an Orbax pytree placed by ``shardings`` (a tree, or a function ``(shapes tree) -> tree``;
    None: replicated, see :func:`_default_sharding`), floats cast to ``dtype``."""
    tree = _tree_metadata(path)
    if callable(shardings):
        shardings = shardings(tree)
    if shardings is None:
        dev = _default_sharding(mesh)
        shardings = jax.tree.map(lambda _: dev, tree)

    def target(m, s):
        dt = dtype if dtype is not None and jax.numpy.issubdtype(m.dtype, jax.numpy.floating) else m.dtype
        return jax.ShapeDtypeStruct(tuple(m.shape), dt, sharding=s)

    ckptr = ocp.StandardCheckpointer()
    try:
        return ckptr.restore(path, jax.tree.map(target, tree, shardings))
    except Exception as e:
        raise ValueError(f"{path}: could not restore ({type(e).__name__}: {str(e)[:300]})") from e
    finally:
        ckptr.close()


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)


def save_stage(
    directory: str | os.PathLike,
    spec: Any,
    params: Any,
    *,
    lora: Any = None,
    lora_config: Any = None,
    base: dict | None = None,
    tokenizer_dir: str | os.PathLike | None = None,
    stage_info: dict | None = None,
    extras: dict[str, Any] | None = None,
    json_extras: dict[str, dict] | None = None,
    adapter_sets: dict[str, tuple[Any, Any]] | None = None,
) -> str:
    """Write a stage checkpoint atomically (``<dir>.tmp``, then rename); returns the final path.

    ``params=None`` with ``base={"path", "fingerprint"}`` records the frozen base instead of copying it
    (LoRA runs). ``adapter_sets``: name -> ``(adapters, LoraConfig)``, further named adapter sets over the
    same base (``<dir>/adapters/<name>/`` + ``<name>.lora_config.json``), e.g. a critic and a reward
    adapter next to the policy's ``lora/``. Every process must call this with the same arguments."""
    final = os.path.abspath(os.fspath(directory))
    reserved = {"params", "lora", "tokenizer", "spec", "stage", "lora_config", "base"}
    for name in list(extras or {}) + list(json_extras or {}):
        if name in reserved or "/" in name:
            raise ValueError(f"save_stage: extra name {name!r} is reserved or not a plain name")
    if params is None and base is None:
        raise ValueError("save_stage: params=None needs base={'path', 'fingerprint'} (where the base lives)")
    if lora is not None and lora_config is None:
        raise ValueError("save_stage: lora adapters given without lora_config")
    if tokenizer_dir is not None and not os.path.isdir(tokenizer_dir):
        raise FileNotFoundError(f"save_stage: tokenizer_dir {tokenizer_dir} is not a directory")
    tmp = f"{final}.tmp"
    if is_primary():
        os.makedirs(os.path.dirname(final), exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier save
        os.makedirs(tmp)
    sync(f"jaxrlhf-stage-start:{final}")
    if params is not None:
        _save_tree(os.path.join(tmp, "params"), params)
    if lora is not None:
        _save_tree(os.path.join(tmp, "lora"), lora)
    for name, tree in (extras or {}).items():
        _save_tree(os.path.join(tmp, name), tree)
    for name, (tree, _) in (adapter_sets or {}).items():
        if "/" in name or not name:
            raise ValueError(f"save_stage: adapter set name {name!r} is not a plain name")
        _save_tree(os.path.join(tmp, "adapters", name), tree)
    sync(f"jaxrlhf-stage-trees:{final}")
    if is_primary():
        if lora is not None:
            with open(os.path.join(tmp, "lora_config.json"), "w") as f:
                f.write(lora_config.to_json())
        if params is None:
            _write_json(os.path.join(tmp, "base.json"), dict(base))
        with open(os.path.join(tmp, "spec.json"), "w") as f:
            f.write(spec.to_json())
        _write_json(os.path.join(tmp, "stage.json"), dict(stage_info or {}))
        if tokenizer_dir is not None:
            shutil.copytree(tokenizer_dir, os.path.join(tmp, "tokenizer"))
        for name, obj in (json_extras or {}).items():
            _write_json(os.path.join(tmp, f"{name}.json"), obj)
        for name, (_, cfg) in (adapter_sets or {}).items():
            with open(os.path.join(tmp, "adapters", f"{name}.lora_config.json"), "w") as f:
                f.write(cfg.to_json())
        old = None
        if os.path.exists(final):
            old = f"{final}.old-{os.getpid()}-{time.time_ns()}"
            os.rename(final, old)
        os.rename(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    sync(f"jaxrlhf-stage-done:{final}")
    return final


def _resolve_stage_dir(path: str) -> str:
    if os.path.isdir(path):
        return path
    # a crash between "move the old one aside" and "rename the new one in" leaves only <dir>.old-*
    olds = sorted(glob.glob(f"{path}.old-*"))
    if olds:
        return olds[-1]
    raise FileNotFoundError(f"{path}: no stage checkpoint here")


def load_base(base: dict, *, mesh: Mesh | None = None, dtype: Any = None, where: str = "") -> tuple[Any, Any]:
    """``(spec, params)`` of a recorded base (``base.json``): a HF directory, or a stage checkpoint whose
    adapters are merged; the content fingerprint must match the one recorded."""
    from jaxrlhf import lora as lora_lib
    from jaxrlhf import models

    path = base["path"]
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"{where}: its frozen base {path} is gone (the stage checkpoint records the base instead of "
            "copying it); restore that directory, or retrain with checkpoint.copy_base=true"
        )
    found = weights_fingerprint(path)
    if base.get("fingerprint") and found != base["fingerprint"]:
        raise ValueError(
            f"{where}: its frozen base {path} changed since it was trained (fingerprint {found[:12]} != "
            f"recorded {base['fingerprint'][:12]}); the adapters only fit the original weights"
        )
    if os.path.isfile(os.path.join(path, "stage.json")):
        ck = load_stage(path, mesh=mesh, dtype=dtype)
        params = ck.params if ck.lora is None else lora_lib.merge(ck.params, ck.lora, ck.lora_config)
        return ck.spec, params
    return models.load_pretrained(path, dtype=dtype, mesh=mesh)


def _adapter_shardings(spec: Any, mesh: Mesh | None):
    """``shapes tree -> shardings`` of an adapter tree by its base layers' logical axes (None: no mesh)."""
    if mesh is None:
        return None
    from jaxrlhf import lora as lora_lib
    from jaxrlhf import models

    axes = models.param_axes(spec)
    return lambda meta: sharding.named_shardings(lora_lib.param_axes(axes, meta), mesh, meta)


def load_stage(
    directory: str | os.PathLike,
    *,
    mesh: Mesh | None = None,
    dtype: Any = None,
    extras: tuple[str, ...] = (),
    base: Any = None,
) -> StageCheckpoint:
    """Read a stage checkpoint. With ``mesh``, params (and adapters) are restored sharded by their logical
    axes and extras replicated on it; ``dtype`` casts floating params on restore; ``extras`` names the
    pytree extras to load (every ``*.json`` extra is always read). A checkpoint that recorded its base
    (``base.json``) loads that base (see :func:`load_base`), unless the caller already holds it: ``base``
    = those params (e.g. PPO's policy base under a LoRA reward model), used as they are, not copied."""
    from jaxrlhf import lora as lora_lib
    from jaxrlhf import models

    path = _resolve_stage_dir(os.path.abspath(os.fspath(directory)))
    spec_file = os.path.join(path, "spec.json")
    if not os.path.isfile(spec_file):
        raise FileNotFoundError(f"{path}: not a stage checkpoint (no spec.json)")
    spec = _read(spec_file, lambda f: models.ModelSpec.from_json(f.read()))
    if os.path.isdir(os.path.join(path, "params")):
        base = None
        p_sh = None
        if mesh is not None:
            p_sh = sharding.named_shardings(models.param_axes(spec), mesh, models.abstract_params(spec))
        params = _restore_tree(os.path.join(path, "params"), p_sh, dtype, mesh)
    elif os.path.isfile(os.path.join(path, "base.json")):
        held = base
        base = _read(os.path.join(path, "base.json"), json.load)
        if held is not None:
            base_spec, params = spec, held
        else:
            base_spec, params = load_base(base, mesh=mesh, dtype=dtype, where=path)
        if base_spec != spec:
            raise ValueError(f"{path}: its recorded base {base['path']} has a different model spec")
    else:
        raise FileNotFoundError(f"{path}: stage checkpoint has neither params/ nor base.json")
    adapters = cfg = None
    if os.path.isdir(os.path.join(path, "lora")):
        cfg = _read(os.path.join(path, "lora_config.json"), lambda f: lora_lib.LoraConfig.from_json(f.read()))
        adapters = _restore_tree(os.path.join(path, "lora"), _adapter_shardings(spec, mesh), None, mesh)
    sets = {}
    for fn in sorted(glob.glob(os.path.join(path, "adapters", "*.lora_config.json"))):
        name = os.path.basename(fn)[: -len(".lora_config.json")]
        set_cfg = _read(fn, lambda f: lora_lib.LoraConfig.from_json(f.read()))
        tree = _restore_tree(os.path.join(path, "adapters", name), _adapter_shardings(spec, mesh), None, mesh)
        sets[name] = (tree, set_cfg)
    info = _read(os.path.join(path, "stage.json"), json.load)
    loaded: dict[str, Any] = {}
    for name in extras:
        if not os.path.isdir(os.path.join(path, name)):
            raise FileNotFoundError(f"{path}: stage checkpoint has no extra {name!r}")
        loaded[name] = _restore_tree(os.path.join(path, name), None, None, mesh)
    for fn in sorted(glob.glob(os.path.join(path, "*.json"))):
        name = os.path.basename(fn)[:-5]
        if name not in ("spec", "stage", "lora_config", "base"):
            loaded[name] = _read(fn, json.load)
    tok = os.path.join(path, "tokenizer")
    tok_dir = tok if os.path.isdir(tok) else None
    return StageCheckpoint(path, spec, params, adapters, cfg, tok_dir, info, loaded, base, sets)
