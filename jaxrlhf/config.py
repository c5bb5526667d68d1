"""YAML files mapped onto frozen dataclasses, with ``--set a.b=c`` overrides and errors that name the key.

A stage declares its config as a tree of frozen dataclasses (``SFTConfig(model=ModelConfig(...), ...)``);
:func:`load_config` reads a YAML mapping, applies overrides and builds the tree, checking every key and type:

- an unknown key is an error naming the source and the key path, with the closest known key::

      configs/tiny/sft.yaml: unknown key 'optim.lrr' (did you mean 'optim.lr'?)

- a wrong type is an error naming the key and the expected type (``key 'train.steps' expects int, got str
  'ten'``); a missing required field is an error naming it; a string that is not one of a ``Literal``'s
  choices gets the closest choice.
- a key whose value came from ``--set`` is blamed on that argument, not on the YAML file
  (``--set optim.lr=abc: key 'optim.lr' expects float, got str 'abc'``); so is a section's own check
  (``__post_init__``) that names a key set on the command line.
- override values are YAML scalars (``--set train.steps=10``, ``--set lora=null``,
  ``--set data.files=[a.jsonl,b.jsonl]``); an override of a key inside an optional section that the file set
  to null (``--set lora.rank=8``) creates that section with its defaults.

Supported field types: ``bool``, ``int``, ``float`` (ints and strings such as ``1e-4`` are accepted),
``str``, ``Literal[...]``, ``X | None``, ``tuple[X, ...]`` / ``tuple[X, Y]`` / ``list[X]`` (from YAML lists),
``dict[str, X]`` / ``dict`` (free-form mappings, e.g. a model spec), and nested dataclasses. The dataclass may
be any frozen dataclass (other modules' ``OptimConfig``, ``LoraConfig`` and ``DataConfig`` are nested as is).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import yaml

T = TypeVar("T")
_MISSING = dataclasses.MISSING


class ConfigError(ValueError):
    """A config that does not fit its dataclasses; the message names the source (file / ``--set``) and key."""


# ---------------------------------------------------------------------------------------------- public API


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> T:
    """Build ``cls`` from the YAML file at ``path`` (None: defaults only) and ``key.path=value`` overrides."""
    raw: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = os.fspath(path)
        raw = read_yaml(source)
        check_keys(cls, raw, source)
    origins: dict[str, str] = {}
    for item in overrides:
        keys, value = parse_override(item)
        check_key_path(cls, keys, f"--set {item}")
        raw = set_path(raw, keys, value)
        dotted = ".".join(keys)
        origins = {k: v for k, v in origins.items() if not (k == dotted or k.startswith(dotted + "."))}
        origins[dotted] = f"--set {item}"
    return from_dict(cls, raw, Sources(source, origins) if origins else source)


class Sources(str):
    """The config's source (the YAML file) that also knows which keys came from ``--set``: ``of(key)`` is
    the ``--set`` argument that set ``key`` (or a section above it), else the file."""

    overrides: dict[str, str]

    def __new__(cls, source: str, overrides: dict[str, str]):
        obj = super().__new__(cls, source)
        obj.overrides = dict(overrides)
        return obj

    def of(self, key: str) -> str:
        best = None
        for k, arg in self.overrides.items():
            if key == k or key.startswith((k + ".", k + "[")):
                if best is None or len(k) > len(best[0]):
                    best = (k, arg)
        return best[1] if best else str(self)

    def within(self, prefix: str) -> dict[str, str]:
        """Overrides of keys inside the section ``prefix`` (dotted, ending in ``.``; "" = everything)."""
        return {k: v for k, v in self.overrides.items() if k.startswith(prefix)}


def _of(source: str, key: str) -> str:
    return source.of(key) if isinstance(source, Sources) else source


def read_yaml(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: config file not found")
    with open(path, "rb") as f:
        blob = f.read()
    try:
        text = blob.decode("utf-8")
    except UnicodeDecodeError as e:
        line = blob[: e.start].count(b"\n") + 1
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}, line {line})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"optim.lr=3e-4"`` -> ``(["optim", "lr"], 3e-4)``; the value is parsed as YAML (scalar / list)."""
    if "=" not in item:
        raise ConfigError(f"--set {item}: expected KEY.PATH=VALUE")
    key, text = item.split("=", 1)
    keys = key.strip().split(".")
    if not all(keys):
        raise ConfigError(f"--set {item}: empty key in {key!r}")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return keys, value


def to_dict(obj: Any) -> Any:
    """A dataclass tree as plain YAML-able data (tuples become lists)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    return obj


def dump_yaml(obj: Any, path: str) -> None:
    """Write a dataclass tree as YAML that :func:`load_config` reads back to an equal object."""
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(to_dict(obj), f, sort_keys=False)


def set_path(raw: dict[str, Any], keys: Sequence[str], value: Any) -> dict[str, Any]:
    """A copy of ``raw`` with ``raw[k0][k1]... = value`` (missing or null sections become mappings)."""
    out = dict(raw)
    head, rest = keys[0], keys[1:]
    if not rest:
        out[head] = value
        return out
    inner = out.get(head)
    out[head] = set_path(inner if isinstance(inner, dict) else {}, rest, value)
    return out


# ---------------------------------------------------------------------------------------------- checking


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _dataclass_in(tp: Any) -> type | None:
    """The dataclass inside ``tp`` (``Cfg`` or ``Cfg | None``), else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    if _is_union(tp):
        for arg in typing.get_args(tp):
            if dataclasses.is_dataclass(arg):
                return arg
    return None


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _unknown(cls: type, key: str, prefix: str, source: str) -> ConfigError:
    names = list(_fields(cls))
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (known keys: {', '.join(names)})"
    return ConfigError(f"{_of(source, prefix + key)}: unknown key '{prefix}{key}'{hint}")


def check_keys(cls: type, raw: Mapping[str, Any], source: str, prefix: str = "") -> None:
    """Raise on the first key of ``raw`` (recursively) that ``cls`` has no field for."""
    fields, hints = _fields(cls), _hints(cls)
    for key, value in raw.items():
        if key not in fields:
            raise _unknown(cls, str(key), prefix, source)
        sub = _dataclass_in(hints[key])
        if sub is not None and isinstance(value, Mapping):
            check_keys(sub, value, source, f"{prefix}{key}.")


def check_key_path(cls: type, keys: Sequence[str], source: str) -> None:
    prefix = ""
    for i, key in enumerate(keys):
        if cls is None:
            raise ConfigError(f"{source}: '{prefix[:-1]}' is not a section, so '{prefix}{key}' is not a key")
        if key not in _fields(cls):
            raise _unknown(cls, key, prefix, source)
        tp = _hints(cls)[key]
        sub = _dataclass_in(tp)
        if sub is None and i < len(keys) - 1 and _is_free_mapping(tp):
            return  # free-form mapping (e.g. a model spec): any sub-key goes
        cls, prefix = sub, f"{prefix}{key}."


def _is_free_mapping(tp: Any) -> bool:
    if _is_union(tp):
        return any(_is_free_mapping(a) for a in typing.get_args(tp))
    return tp is dict or typing.get_origin(tp) is dict or tp is Any


# ---------------------------------------------------------------------------------------------- building


def from_dict(cls: type[T], raw: Mapping[str, Any], source: str = "<dict>", prefix: str = "") -> T:
    """Build the dataclass ``cls`` from a mapping, converting and checking every field."""
    if not isinstance(raw, Mapping):
        name = prefix[:-1] or "<top level>"
        raise ConfigError(
            f"{_of(source, name)}: key '{name}' expects a mapping ({cls.__name__}), got {_show(raw)}"
        )
    check_keys(cls, raw, source, prefix)
    fields, hints = _fields(cls), _hints(cls)
    kwargs = {}
    for name, field in fields.items():
        key = prefix + name
        if name in raw:
            kwargs[name] = _convert(hints[name], raw[name], source, key)
        elif field.default is _MISSING and field.default_factory is _MISSING:
            raise ConfigError(f"{_of(source, key)}: missing required key '{key}' ({_type_name(hints[name])})")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        where = f"section '{prefix[:-1]}'" if prefix else "config"
        raise ConfigError(f"{_blame(source, prefix, str(e))}: invalid {where}: {e}") from e


def _blame(source: str, prefix: str, message: str) -> str:
    """Who to name for a section's own check: the ``--set`` argument of a key of that section that the
    message mentions, else the file (with the section's overrides, if any)."""
    if not isinstance(source, Sources):
        return source
    inside = source.within(prefix)
    named = [arg for k, arg in inside.items() if k[len(prefix) :].split(".")[0] in message]
    if len(named) == 1:
        return named[0]
    if inside:
        return f"{source} with {', '.join(inside.values())}"
    return str(source)


def _convert(tp: Any, value: Any, source: str, key: str) -> Any:
    def fail() -> ConfigError:
        return ConfigError(f"{_of(source, key)}: key '{key}' expects {_type_name(tp)}, got {_show(value)}")

    if tp is Any:
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if _is_union(tp):
        if value is None:
            if type(None) in args:
                return None
            raise fail()
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, source, key)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise fail()
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, source, key + ".")
    if origin is typing.Literal:
        if value in args:
            return value
        choices = [a for a in args if isinstance(a, str)]
        close = difflib.get_close_matches(value, choices, n=1, cutoff=0.5) if isinstance(value, str) else []
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"{_of(source, key)}: key '{key}' expects one of {list(args)}, got {_show(value)}{hint}"
        )
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise fail()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise fail()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "1e-4" as a string
            except ValueError:
                pass
        raise fail()
    if tp is str:
        if isinstance(value, str):
            return value
        raise fail()
    if origin in (tuple, list) or tp in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise fail()
        if not args:
            items = list(value)
        elif origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise fail()
            items = [
                _convert(a, v, source, f"{key}[{i}]")
                for i, (a, v) in enumerate(zip(args, value, strict=True))
            ]
        else:
            items = [_convert(args[0], v, source, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin or tp) is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise fail()
        vt = args[1] if args else Any
        return {k: _convert(vt, v, source, f"{key}.{k}") for k, v in value.items()}
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise fail()


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if _is_union(tp):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    if origin in (tuple, list):
        inner = _type_name(args[0]) if args else "any"
        return f"a list of {inner}"
    if origin is dict or tp is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _show(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"
