"""Hugging Face checkpoints <-> jaxrlhf params: weight-name maps and safetensors streaming.

``load_pretrained`` reads ``config.json`` and the safetensors file(s) tensor by tensor, converts each tensor
through the family's :class:`~jaxrlhf.models.weights.WeightSpec` list and, given a mesh, places it straight
onto its ``NamedSharding`` (each device receives only its slice).

Nothing in a model directory runs: weights are read from safetensors only (raw tensors plus a JSON header),
never unpickled — a directory holding only pickle files (``pytorch_model.bin``, ``*.pt`` ...) is refused
with the command that converts it (:class:`PickleCheckpointError`). A truncated or corrupt file (a safetensors
header that does not parse or does not cover the file, an index naming a missing shard, a tensor that
cannot be read) is a :class:`CheckpointError` naming the file and what is wrong.

``save_pretrained`` writes a directory that ``transformers.AutoModelForCausalLM.from_pretrained`` loads
(sharded with an index past ``max_shard_size``); each file is written under a temporary name and renamed.
"""

from __future__ import annotations

import json
import os
import re
import struct
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import Mesh
from safetensors import SafetensorError, safe_open

from jaxrlhf import sharding
from jaxrlhf.models import hf_maps
from jaxrlhf.models.spec import ConfigError, ModelSpec, load_hf_config
from jaxrlhf.models.weights import WeightSpec

_ST_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_NP_TO_ST = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint whose tensors do not fit the model (names the tensor, the file and the shapes), or a
    weights file that is truncated or corrupt (names the file)."""


class PickleCheckpointError(CheckpointError):
    """A model directory whose weights exist only as pickle files, which jaxrlhf never loads (unpickling a
    file runs the code inside it)."""


PICKLE_PATTERNS = ("pytorch_model*.bin", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle")
CONVERT_HINT = (
    'convert it once, where you trust the file, with: python -c "import transformers; '
    "m = transformers.AutoModelForCausalLM.from_pretrained('{src}', use_safetensors=False); "
    "m.save_pretrained('{dst}', safe_serialization=True)\" (AutoModelForSeq2SeqLM for T5), copy the "
    "tokenizer files along, and load the new directory"
)


def _corrupt(path: str, what: str) -> CheckpointError:
    size = os.path.getsize(path) if os.path.exists(path) else 0
    return CheckpointError(
        f"{path}: {what} ({size} bytes on disk): the file is truncated or corrupt; download or export it "
        "again"
    )


def hf_weight_specs(spec: ModelSpec) -> list[WeightSpec]:
    if spec.is_encoder_decoder:
        from jaxrlhf.models import t5

        return t5.hf_weight_specs(spec)
    return hf_maps.decoder_weight_specs(spec)


def hf_architecture(spec: ModelSpec) -> str:
    if spec.is_encoder_decoder:
        from jaxrlhf.models import t5

        return t5.hf_architecture(spec)
    return hf_maps.ARCHITECTURES[spec.model_type]


# ---------------------------------------------------------------------------------------------- reading


class _Reader:
    """Tensor-by-tensor access to one safetensors file (numpy; bfloat16 through ml_dtypes)."""

    def __init__(self, path: str):
        self.path = path
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: weights file missing (named by the model's safetensors index)")
        try:
            self._f = safe_open(path, framework="np")
        except SafetensorError as e:
            raise _corrupt(path, f"not a readable safetensors file ({e})") from None
        self.names = list(self._f.keys())
        self._raw: dict[str, Any] | None = None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._f.get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        try:
            return self._get(name)
        except (SafetensorError, OSError, ValueError, KeyError) as e:
            raise _corrupt(self.path, f"cannot read tensor {name!r} ({type(e).__name__}: {e})") from None

    def _get(self, name: str) -> np.ndarray:
        if self._f.get_slice(name).get_dtype() != "BF16":
            return self._f.get_tensor(name)
        # numpy has no bfloat16: read the raw bytes (memory-mapped) and view them through ml_dtypes
        if self._raw is None:
            with open(self.path, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
            self._raw = {"base": 8 + n, "header": header, "mm": np.memmap(self.path, np.uint8, "r")}
        info = self._raw["header"][name]
        start, end = info["data_offsets"]
        base = self._raw["base"]
        buf = self._raw["mm"][base + start : base + end]
        return np.array(buf.view(ml_dtypes.bfloat16).reshape(info["shape"]))


# config.json keys (any family) that must be positive integers / numbers when present and not null
_POSITIVE_INT_KEYS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "intermediate_size", "head_dim", "max_position_embeddings", "n_embd", "n_layer", "n_head", "n_positions",
    "n_inner", "ffn_dim", "word_embed_proj_dim", "d_model", "d_ff", "d_kv", "num_layers", "num_heads",
    "num_decoder_layers", "relative_attention_num_buckets", "relative_attention_max_distance",
)  # fmt: skip
_NOT_NULL_KEYS = {
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "n_embd", "n_layer", "n_head",
    "d_model", "num_layers", "num_heads", "d_ff", "d_kv",
}  # fmt: skip
_NUMBER_KEYS = ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "rope_theta", "initializer_range")


def check_hf_config(config: dict, where: str) -> None:
    """Refuse a ``config.json`` whose sizes are not positive integers (or whose epsilons / rope base are not
    numbers), naming the file and the key, before any array is shaped from them."""
    for key in _POSITIVE_INT_KEYS:
        v = config.get(key)
        if v is None and not (key in config and key in _NOT_NULL_KEYS):
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ConfigError(f"{where}: key {key!r} must be a positive integer, got {v!r}")
    for key in _NUMBER_KEYS:
        v = config.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise ConfigError(f"{where}: key {key!r} must be a number, got {v!r}")


def _resolve_dir(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if os.path.isdir(path):
        return path
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", path) and not os.path.exists(path):
        from huggingface_hub import snapshot_download

        return snapshot_download(
            path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
        )
    raise FileNotFoundError(
        f"{path}: not a directory (expected a Hugging Face model directory or an org/name hub id)"
    )


def _index_files(index: str) -> list[str]:
    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
    except json.JSONDecodeError as e:
        raise _corrupt(index, f"invalid JSON ({e})") from None
    except (KeyError, TypeError, AttributeError):
        raise _corrupt(index, "not a safetensors index (no 'weight_map' mapping of tensor -> file)") from None
    bad = [f for f in files if not isinstance(f, str) or os.path.isabs(f) or ".." in f.split("/")]
    if bad:
        raise CheckpointError(f"{index}: weight_map names files outside the directory: {bad[:3]}")
    return files


def _open_files(path: str) -> list[_Reader]:
    import glob

    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(index):
        return [_Reader(os.path.join(path, fn)) for fn in _index_files(index)]
    if os.path.isfile(single):
        return [_Reader(single)]
    pickles = sorted(
        {os.path.basename(f) for pat in PICKLE_PATTERNS for f in glob.glob(os.path.join(path, pat))}
    )
    if pickles:
        src = os.path.abspath(path).rstrip("/")
        raise PickleCheckpointError(
            f"{path}: weights only as pickle files ({', '.join(pickles[:4])}); jaxrlhf reads safetensors "
            "only and never unpickles a file (loading a pickle runs the code inside it). "
            + CONVERT_HINT.format(src=src, dst=src + "-safetensors")
        )
    raise FileNotFoundError(
        f"{path}: no model.safetensors or model.safetensors.index.json (safetensors only)"
    )


def _expected_hf_shapes(ws: WeightSpec, shapes: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """HF tensor shapes implied by the param shapes (runs ``save`` on zero-stride int8 stand-ins)."""
    fakes = [np.broadcast_to(np.zeros((), np.int8), s) for s in shapes]
    return [tuple(x.shape) for x in ws.save(fakes)]


def _get_path(tree: dict, path: tuple[str, ...]):
    for p in path:
        tree = tree[p]
    return tree


def _set_path(tree: dict, path: tuple[str, ...], value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def load_pretrained(
    path: str | os.PathLike, dtype: Any = jnp.float32, mesh: Mesh | None = None
) -> tuple[ModelSpec, dict]:
    """Read a HF model directory -> ``(spec, params)``; params in ``dtype``, sharded on ``mesh`` if given.

    Tensor names are accepted with or without the CausalLM prefix (``model.`` / ``transformer.``), so
    base-model checkpoints load too. Errors name the missing / unexpected / wrongly-shaped tensor and file.
    """
    from jaxrlhf.models import abstract_params, param_axes

    path = _resolve_dir(path)
    hf_config = load_hf_config(path)
    if not isinstance(hf_config, dict):
        raise ConfigError(
            f"{os.path.join(path, 'config.json')}: expected a JSON object of model settings, got "
            f"{type(hf_config).__name__}"
        )
    check_hf_config(hf_config, os.path.join(path, "config.json"))
    spec = ModelSpec.from_hf_config(hf_config, source=os.path.join(path, "config.json"))
    readers = _open_files(path)
    where = {name: r for r in readers for name in r.names}
    if spec.is_encoder_decoder:  # T5 config.json may misstate head tying; the tensors decide
        from jaxrlhf.models import t5

        spec = t5.spec_for_checkpoint(spec, where, lambda n: where[n].get(n))
    wspecs = hf_weight_specs(spec)
    expected = {n for ws in wspecs for n in ws.hf_names}
    prefixes = hf_maps.PREFIXES.get(spec.model_type, ())
    resolve: dict[str, str] = {}  # expected name -> name in the files
    for actual in where:
        for cand in (actual, *(p + actual for p in prefixes)):
            if cand in expected:
                resolve.setdefault(cand, actual)
                break
    used = set(resolve.values())
    files = ", ".join(os.path.basename(r.path) for r in readers)
    for actual, r in where.items():
        if actual not in used and not hf_maps.is_ignorable(spec, actual):
            raise CheckpointError(f"{r.path}: unexpected tensor {actual!r} for a {spec.model_type} model")
    missing = sorted(expected - set(resolve))
    if missing:
        raise CheckpointError(
            f"{path}: missing tensor {missing[0]!r} (not found in {files}); {len(missing)} missing"
        )

    abstract = abstract_params(spec, dtype)
    shardings = sharding.named_shardings(param_axes(spec), mesh, abstract) if mesh is not None else None
    params: dict = {}
    for ws in wspecs:
        names = [resolve[n] for n in ws.hf_names]
        want = [tuple(_get_path(abstract, p).shape) for p in ws.paths]
        tensors = [where[n].get(n) for n in names]
        try:
            arrays = ws.load(tensors)
            ok = [tuple(np.shape(a)) for a in arrays] == want
        except ValueError:
            ok = False
        if not ok:
            for n, x, exp in zip(names, tensors, _expected_hf_shapes(ws, want), strict=True):
                if tuple(x.shape) != tuple(exp):
                    raise CheckpointError(
                        f"{where[n].path}: tensor {n!r} has shape {tuple(x.shape)}, expected {tuple(exp)} "
                        "from config.json"
                    )
            raise CheckpointError(f"{path}: tensors {names} do not convert to param shapes {want}")
        for p, arr in zip(ws.paths, arrays, strict=True):
            arr = np.asarray(arr).astype(jnp.dtype(dtype))
            if shardings is None:
                value = jnp.asarray(arr)
            else:
                value = jax.make_array_from_callback(
                    arr.shape, _get_path(shardings, p), lambda idx, a=arr: a[idx]
                )
            _set_path(params, p, value)
    return spec, params


# ---------------------------------------------------------------------------------------------- writing


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)\s*", size.upper())
    if not m:
        raise ValueError(f"max_shard_size {size!r}: expected bytes or a string like '5GB'")
    unit = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    return int(float(m.group(1)) * unit[m.group(2)])


def write_safetensors(path: str, tensors: dict[str, np.ndarray]) -> None:
    """Write ``tensors`` as safetensors: u64 header size, JSON header (8-byte aligned), raw data."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, x in tensors.items():
        header[name] = {
            "dtype": _NP_TO_ST[x.dtype],
            "shape": list(x.shape),
            "data_offsets": [offset, offset + x.nbytes],
        }
        offset += x.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for x in tensors.values():
                f.write(np.ascontiguousarray(x).tobytes())
        os.replace(tmp, path)  # a crash or a full disk never leaves a truncated file under the final name
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


_TORCH_DTYPE = {
    np.dtype(np.float32): "float32",
    np.dtype(ml_dtypes.bfloat16): "bfloat16",
    np.dtype(np.float16): "float16",
}


def save_pretrained(
    spec: ModelSpec, params: dict, out_dir: str | os.PathLike, max_shard_size: int | str = "5GB"
) -> None:
    """Write ``config.json`` + ``model.safetensors`` (or ``model-0000i-of-0000n.safetensors`` + index).

    Tensors keep the params' dtype; sharded params are gathered one tensor at a time.
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    wspecs = hf_weight_specs(spec)
    limit = _parse_size(max_shard_size)
    # plan shards from sizes alone, then convert and write one shard at a time
    groups: list[list[WeightSpec]] = [[]]
    size = total = 0
    for ws in wspecs:
        nbytes = sum(_get_path(params, p).size * _get_path(params, p).dtype.itemsize for p in ws.paths)
        if groups[-1] and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(ws)
        size += nbytes
        total += nbytes
    dtype = np.dtype(_get_path(params, wspecs[0].paths[0]).dtype)
    weight_map = {}
    for i, group in enumerate(groups):
        fname = (
            "model.safetensors" if len(groups) == 1 else f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        )
        tensors = {}
        for ws in group:
            arrays = [np.asarray(jax.device_get(_get_path(params, p))) for p in ws.paths]
            for name, x in zip(ws.hf_names, ws.save(arrays), strict=True):
                tensors[name] = x
                weight_map[name] = fname
        write_safetensors(os.path.join(out_dir, fname), tensors)
    if len(groups) > 1:
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    config = spec.to_hf_config()
    config["architectures"] = [hf_architecture(spec)]
    config["torch_dtype"] = config["dtype"] = _TORCH_DTYPE.get(dtype, "float32")
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
