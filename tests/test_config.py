"""The YAML -> frozen dataclass loader: unknown keys, wrong types, nested --set overrides, round trips."""

from __future__ import annotations

import dataclasses
from typing import Literal

import pytest

from jaxrlhf.config import ConfigError, dump_yaml, load_config, parse_override


@dataclasses.dataclass(frozen=True)
class Optim:
    lr: float = 1e-3
    schedule: Literal["constant", "cosine"] = "cosine"
    clip_norm: float | None = 1.0


@dataclasses.dataclass(frozen=True)
class Lora:
    rank: int
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")


@dataclasses.dataclass(frozen=True)
class Model:
    path: str | None = None
    spec: dict | None = None


@dataclasses.dataclass(frozen=True)
class Cfg:
    name: str = "run"
    steps: int = 10
    verbose: bool = False
    optim: Optim = Optim()
    model: Model = Model()
    lora: Lora | None = None


def write(tmp_path, text: str) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return str(path)


def test_nested_values_and_defaults(tmp_path):
    path = write(tmp_path, "steps: 5\noptim:\n  lr: 1e-4\nlora:\n  rank: 4\n  targets: [q_proj]\n")
    cfg = load_config(Cfg, path)
    assert cfg == Cfg(steps=5, optim=Optim(lr=1e-4), lora=Lora(rank=4, targets=("q_proj",)))
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == 1e-4  # YAML 1.1 reads "1e-4" as a string


def test_unknown_key_names_file_and_path_with_suggestion(tmp_path):
    path = write(tmp_path, "optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(Cfg, path)
    assert str(e.value) == f"{path}: unknown key 'optim.lrr' (did you mean 'optim.lr'?)"


def test_unknown_top_level_key_without_close_match_lists_known(tmp_path):
    with pytest.raises(ConfigError, match=r"cfg.yaml: unknown key 'zzz' \(known keys: name, steps"):
        load_config(Cfg, write(tmp_path, "zzz: 1\n"))


def test_unknown_key_inside_optional_section(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'lora.rnak' \(did you mean 'lora.rank'\?\)"):
        load_config(Cfg, write(tmp_path, "lora:\n  rnak: 4\n"))


@pytest.mark.parametrize(
    "text, message",
    [
        ("steps: ten\n", "key 'steps' expects int, got str 'ten'"),
        ("steps: 1.5\n", "key 'steps' expects int, got float 1.5"),
        ("steps: true\n", "key 'steps' expects int, got bool True"),
        ("verbose: 1\n", "key 'verbose' expects bool, got int 1"),
        ("optim:\n  lr: fast\n", "key 'optim.lr' expects float, got str 'fast'"),
        ("optim:\n  schedule: linear\n", "key 'optim.schedule' expects one of ['constant', 'cosine']"),
        ("optim: 3\n", "key 'optim' expects a mapping (Optim), got int 3"),
        ("lora:\n  rank: 4\n  targets: q_proj\n", "key 'lora.targets' expects a list of str"),
        ("lora:\n  rank: [4]\n", "key 'lora.rank' expects int, got list"),
        ("name: null\n", "key 'name' expects str, got NoneType None"),
    ],
)
def test_wrong_types_name_file_key_and_expected_type(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(Cfg, path)
    assert str(e.value).startswith(f"{path}: ")
    assert message in str(e.value)


def test_missing_required_key(tmp_path):
    with pytest.raises(ConfigError, match=r"missing required key 'lora.rank' \(int\)"):
        load_config(Cfg, write(tmp_path, "lora:\n  alpha: 8\n"))


def test_overrides_nested_typed_and_create_optional_sections(tmp_path):
    path = write(tmp_path, "steps: 5\noptim:\n  lr: 0.1\n")
    cfg = load_config(
        Cfg,
        path,
        [
            "optim.lr=3e-4",
            "optim.clip_norm=null",
            "lora.rank=8",
            "lora.targets=[o_proj, up_proj]",
            "name=a=b",
            "model.spec.hidden_size=64",
            "verbose=true",
        ],
    )
    assert cfg.steps == 5 and cfg.name == "a=b" and cfg.verbose is True
    assert cfg.optim == Optim(lr=3e-4, clip_norm=None)
    assert cfg.lora == Lora(rank=8, targets=("o_proj", "up_proj"))
    assert cfg.model.spec == {"hidden_size": 64}
    assert load_config(Cfg, path, ["lora.rank=8", "lora=null"]).lora is None


def test_override_errors_name_the_override():
    with pytest.raises(ConfigError) as e:
        load_config(Cfg, None, ["optim.lrr=0.1"])
    assert str(e.value) == "--set optim.lrr=0.1: unknown key 'optim.lrr' (did you mean 'optim.lr'?)"
    with pytest.raises(ConfigError, match=r"'steps' is not a section"):
        load_config(Cfg, None, ["steps.x=1"])
    with pytest.raises(ConfigError, match="expected KEY.PATH=VALUE"):
        parse_override("steps")
    with pytest.raises(ConfigError, match="key 'steps' expects int, got str 'many'"):
        load_config(Cfg, None, ["steps=many"])


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Cfg, str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(Cfg, write(tmp_path, "steps: [1\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(Cfg, write(tmp_path, "- 1\n- 2\n"))


def test_dataclass_validation_errors_are_reported_with_the_file(tmp_path):
    @dataclasses.dataclass(frozen=True)
    class Checked:
        n: int = 1

        def __post_init__(self):
            if self.n < 1:
                raise ValueError(f"n must be >= 1, got {self.n}")

    with pytest.raises(ConfigError, match=r"cfg.yaml: invalid config: n must be >= 1, got 0"):
        load_config(Checked, write(tmp_path, "n: 0\n"))


def test_dump_round_trip(tmp_path):
    cfg = Cfg(steps=3, optim=Optim(lr=2e-5, clip_norm=None), lora=Lora(rank=2), model=Model(spec={"a": 1}))
    out = tmp_path / "dump.yaml"
    dump_yaml(cfg, str(out))
    assert load_config(Cfg, str(out)) == cfg


@pytest.mark.parametrize(
    "path", ["configs/tiny/sft.yaml", "configs/llama3_8b/sft_lora.yaml", "configs/flan_t5_base/sft.yaml"]
)
def test_bundled_sft_configs_load(path):
    import os

    from jaxrlhf.stages.sft import SFTConfig

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(SFTConfig, os.path.join(root, path))
    assert cfg.optim.total_steps > 0 and cfg.data.path
