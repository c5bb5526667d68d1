"""The example commands written in launch/ (docstrings, comments) name configs and keys that exist."""

from __future__ import annotations

import importlib
import os
import re
import shlex

import pytest

from jaxrlhf import cli
from jaxrlhf.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCH = os.path.join(ROOT, "launch")
COMMAND = re.compile(r"\b(" + "|".join(cli.STAGES) + r") --config (configs/[\w./-]+\.yaml)((?: --set \S+)*)")


def _examples() -> list[tuple[str, str, str, list[str]]]:
    out = []
    for name in sorted(os.listdir(LAUNCH)):
        text = open(os.path.join(LAUNCH, name), encoding="utf-8").read()
        for m in COMMAND.finditer(text):
            sets = [s for s in shlex.split(m.group(3).replace('"', " ")) if s != "--set"]
            out.append((name, m.group(1), m.group(2), sets))
    return out


EXAMPLES = _examples()


def test_launch_files_have_examples():
    assert len(EXAMPLES) >= 5, EXAMPLES


@pytest.mark.parametrize(("where", "stage", "config", "sets"), EXAMPLES, ids=lambda x: str(x)[:40])
def test_example_command_loads(where, stage, config, sets):
    module_name, class_names, _ = cli.STAGES[stage]
    cls = getattr(importlib.import_module(module_name), class_names[0])
    path = os.path.join(ROOT, config)
    assert os.path.exists(path), f"launch/{where}: {config} does not exist"
    load_config(cls, path, sets)  # unknown keys / bad values raise
