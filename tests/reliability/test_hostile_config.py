"""Hostile configs: hypothesis-fuzzed ``--set`` values for every leaf key of every stage config, fuzzed YAML
files, and misspelled keys. Every failure is a :class:`ConfigError` (never a TypeError / AttributeError or a
crash later inside JAX) that names where the bad value came from: the ``--set`` argument for an override,
the YAML file for a file value; a misspelled key (section or leaf) gets the closest known key.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import typing

import hypothesis
import hypothesis.strategies as st
import pytest
import yaml

from jaxrlhf import config as config_lib
from jaxrlhf.config import ConfigError, load_config
from jaxrlhf.stages.dpo import DPOConfig
from jaxrlhf.stages.rm import RMConfig
from jaxrlhf.stages.sft import SFTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STAGES = {
    "sft": (SFTConfig, "configs/tiny/sft.yaml"),
    "rm": (RMConfig, "configs/tiny/rm.yaml"),
    "dpo": (DPOConfig, "configs/tiny/dpo.yaml"),
}


def leaf_keys(cls, prefix=""):
    """Dotted keys of every non-section field of a config dataclass tree."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        sub = config_lib._dataclass_in(hints[f.name])
        if sub is not None:
            out += leaf_keys(sub, f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


_values = st.one_of(
    st.text(max_size=10),
    st.sampled_from(
        ["null", "true", "1e-4", "-1", "0", "[1, 2", "[a, b]", "{a: 1}", "{", ":", "!!binary AAA", "1.5", "~"]
    ),
    st.integers(-10, 10).map(str),
)


@pytest.mark.parametrize("stage", list(STAGES))
def test_fuzzed_set_values_fail_naming_the_set_argument(stage):
    cls, path = STAGES[stage]
    path = os.path.join(ROOT, path)
    keys = leaf_keys(cls)

    @hypothesis.settings(max_examples=60, deadline=None, derandomize=True)
    @hypothesis.given(st.sampled_from(keys), _values)
    def check(key, value):
        item = f"{key}={value}"
        try:
            load_config(cls, path, [item])
        except ConfigError as e:
            assert f"--set {item}" in str(e), str(e)

    check()


_yaml_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=True), st.text(max_size=6)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


@pytest.mark.parametrize("stage", list(STAGES))
def test_fuzzed_yaml_files_fail_naming_the_file(stage):
    cls, path = STAGES[stage]
    base = yaml.safe_load(open(os.path.join(ROOT, path)))
    keys = leaf_keys(cls)

    @hypothesis.settings(max_examples=40, deadline=None, derandomize=True)
    @hypothesis.given(
        st.sampled_from(keys + ["data", "optim", "train"]), _yaml_values, st.binary(max_size=20)
    )
    def check(key, value, junk):
        raw = config_lib.set_path(base, key.split("."), value)
        with tempfile.TemporaryDirectory() as d:
            f = os.path.join(d, "c.yaml")
            with open(f, "w") as fh:
                yaml.safe_dump(raw, fh)
            try:
                load_config(cls, f)
            except ConfigError as e:
                assert str(e).startswith(f"{f}: "), str(e)
            with open(f, "ab") as fh:  # a corrupt tail: invalid YAML, bad encoding, or one more key
                fh.write(b"\n" + junk)
            try:
                load_config(cls, f)
            except ConfigError as e:
                assert str(e).startswith(f"{f}: "), str(e)

    check()


def _typo(key: str) -> str:
    """The key with two letters of its last part swapped (a common typo)."""
    head, _, last = key.rpartition(".")
    i = max(1, len(last) // 2)
    last = last[: i - 1] + last[i] + last[i - 1] + last[i + 1 :] if len(last) > 2 else last + "x"
    return f"{head}.{last}" if head else last


@pytest.mark.parametrize("stage", list(STAGES))
def test_misspelled_keys_get_did_you_mean(stage, tmp_path):
    cls, path = STAGES[stage]
    keys = [k for k in leaf_keys(cls) if len(k.rpartition(".")[2]) > 3]
    missed = []
    for key in keys:
        wrong = _typo(key)
        if wrong == key:
            continue
        with pytest.raises(ConfigError) as e:
            load_config(cls, os.path.join(ROOT, path), [f"{wrong}=1"])
        assert f"--set {wrong}=1: unknown key '{wrong}'" in str(e.value)
        if f"did you mean '{key}'?" not in str(e.value):
            missed.append((wrong, str(e.value)))
        f = tmp_path / "typo.yaml"
        f.write_text(yaml.safe_dump(config_lib.set_path({}, wrong.split("."), 1)))
        with pytest.raises(ConfigError, match=f"unknown key '{wrong}'") as e:
            load_config(cls, f)
        assert str(e.value).startswith(f"{f}: ")
    assert missed == [], missed


def test_bad_set_value_names_the_set_argument_not_the_file():
    path = os.path.join(ROOT, "configs/tiny/sft.yaml")
    cases = {
        "optim.lr=abc": "key 'optim.lr' expects float, got str 'abc'",
        "data.batch_size=[1,2": "key 'data.batch_size' expects int",
        "data.on_bad_row=skp": "on_bad_row must be one of",
        "tokenizer.pad_policy=eso": "(did you mean 'eos'?)",
        "lora={rnk: 8}": "unknown key 'lora.rnk' (did you mean 'lora.rank'?)",
        "optim=3": "key 'optim' expects a mapping",
    }
    for item, want in cases.items():
        with pytest.raises(ConfigError) as e:
            load_config(SFTConfig, path, [item])
        assert str(e.value).startswith(f"--set {item}: ") and want in str(e.value), str(e.value)
    # a value from the file is still blamed on the file, even with unrelated overrides
    with pytest.raises(ConfigError) as e:
        load_config(
            SFTConfig,
            path,
            ["optim.lr=abc", "optim.lr=1e-3", "data.max_length=8", "data.max_prompt_length=9"],
        )
    assert "max_prompt_length must be smaller" in str(e.value) and "--set data.max_prompt_length=9" in str(
        e.value
    )
