"""``jaxrlhf <stage> --help``: every config key with its type, default and doc, read from the dataclasses.

Docs come from the class docstrings, which describe their fields as ````name``: text``; RST markup
(````x````, ``:class:`~a.B```) is shown as plain text.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from typing import Any

from jaxrlhf import config as config_lib

_ROLE = re.compile(r":[a-z]+:`~?([^`]+)`")
_CODE = re.compile(r"``([^`]+)``")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Description and epilog as written (the key table is pre-formatted)."""


def plain(text: str) -> str:
    """RST roles and literals -> plain text (``:class:`~a.b.C``` -> ``C``)."""
    text = _ROLE.sub(lambda m: m.group(1).split(".")[-1], text)
    return _CODE.sub(lambda m: m.group(1), text)


def field_docs(cls: type) -> dict[str, str]:
    """``{field: doc}`` from ````field``: text`` (or ````a`` / ``b``: text``) phrases of the docstrings of
    ``cls`` and its bases; a phrase ends at the next ````name``:`` phrase."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        text = " ".join((klass.__dict__.get("__doc__") or "").split())
        if not text:
            continue
        names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
        # positions of "``a``[ / ``b``...][ (...)]:" phrases
        pattern = re.compile(r"((?:``\w+``(?:\s*/\s*)?)+)(\s*\([^)]*\))?:\s")
        hits = list(pattern.finditer(text))
        for i, m in enumerate(hits):
            end = hits[i + 1].start() if i + 1 < len(hits) else len(text)
            doc = plain((m.group(2) or "").strip() + " " + text[m.end() : end]).strip(" ;,")
            doc = doc[:1].upper() + doc[1:] if doc else doc
            for name in re.findall(r"``(\w+)``", m.group(1)):
                if name in names:
                    docs[name] = doc
    return docs


def _type_name(tp: Any) -> str:
    name = config_lib._type_name(tp)  # the loader's own wording ("int", "one of 'a', 'b'", ...)
    return name.replace("a mapping (", "").rstrip(")") if dataclasses.is_dataclass(tp) else name


def _default_of(field: dataclasses.Field, parent_default: Any) -> Any:
    if parent_default is not None and dataclasses.is_dataclass(parent_default):
        return getattr(parent_default, field.name)
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def _show(value: Any) -> str:
    if value is dataclasses.MISSING:
        return "required"
    value = config_lib.to_dict(value)
    text = "null" if value is None else str(value).lower() if isinstance(value, bool) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def config_rows(cls: type, prefix: str = "", default: Any = None) -> list[tuple[str, str, str, str]]:
    """``(key, type, default, doc)`` for every leaf key of ``cls`` (sections recursed; an optional section
    that defaults to null gets its own row and the keys of its class with the class defaults)."""
    rows = []
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key, tp = prefix + f.name, hints[f.name]
        value = _default_of(f, default)
        sub = config_lib._dataclass_in(tp)
        if sub is not None and not config_lib._is_free_mapping(tp):
            if value is None or value is dataclasses.MISSING:
                what = "optional section" if value is None else "required section"
                rows.append((key, what, _show(value), docs.get(f.name, "")))
                value = None
            rows.extend(config_rows(sub, key + ".", value))
            continue
        rows.append((key, _type_name(tp), _show(value), docs.get(f.name, "")))
    return rows


def config_help(cls: type, stage: str) -> str:
    """The epilog of ``jaxrlhf <stage> --help``: a table of every config key."""
    rows = config_rows(cls)
    width = min(36, max(len(k) for k, *_ in rows) + 2)
    lines = [f"config keys of {cls.__name__} (YAML sections, or --set KEY=VALUE):", ""]
    for key, tp, default, doc in rows:
        lines.append(f"  {key:<{width}}{tp}, default {default}")
        if doc:
            lines.append(f"  {'':<{width}}  {doc}")
    if stage == "pipeline":
        lines += [
            "",
            "each stage section (sft, rm, ppo, dpo, grpo) takes the keys of `jaxrlhf <stage> --help`, e.g.",
            "  --set sft.optim.total_steps=100; 'from: FILE.yaml' names a stage YAML the section overrides",
        ]
    return "\n".join(lines)
