"""Nothing runs from a file: pickle weights are refused (never unpickled), tokenizer / model directories that
ask to run their own Python (``auto_map``) are refused without a terminal prompt unless the caller opts in,
config YAML is safe-loaded, and chat templates render in Jinja's sandbox. Every hostile file here would
write a marker file if its code ran; the tests check the marker is absent.
"""

from __future__ import annotations

import builtins
import json
import os
import pickle
import shutil
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "data"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "models"))
import _tokenizers  # noqa: E402
from _hf_tiny import tiny_hf_causal_lm  # noqa: E402

from jaxrlhf import data, models  # noqa: E402
from jaxrlhf.config import ConfigError, load_config  # noqa: E402
from jaxrlhf.models import hf_io  # noqa: E402
from jaxrlhf.stages.sft import SFTConfig  # noqa: E402


class _Payload:
    """Unpickling this runs ``open(marker, "w")``: what a hostile ``pytorch_model.bin`` does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return tiny_hf_causal_lm("llama2", tmp_path_factory.mktemp("untrusted"))[1]


@pytest.fixture
def no_prompt(monkeypatch):
    """Records every ``input()`` call (a prompt on the terminal) instead of blocking."""
    calls = []
    monkeypatch.setattr(builtins, "input", lambda *a: calls.append(a) or "n")
    return calls


def test_pickle_only_directory_is_refused_with_the_conversion(hf_dir, tmp_path):
    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copy(os.path.join(hf_dir, "config.json"), d)
    marker = tmp_path / "UNPICKLED"
    with open(d / "pytorch_model.bin", "wb") as f:
        pickle.dump(_Payload(str(marker)), f)
    with pytest.raises(hf_io.PickleCheckpointError) as e:
        models.load_pretrained(d)
    msg = str(e.value)
    assert str(d) in msg and "pytorch_model.bin" in msg and "never unpickles" in msg
    assert "save_pretrained" in msg and "safe_serialization=True" in msg and f"{d}-safetensors" in msg
    assert not marker.exists()
    # a sharded pickle checkpoint (pytorch_model-00001-of-00002.bin + index) is refused the same way
    os.rename(d / "pytorch_model.bin", d / "pytorch_model-00001-of-00002.bin")
    (d / "pytorch_model.bin.index.json").write_text('{"weight_map": {}}')
    with pytest.raises(hf_io.PickleCheckpointError, match="pytorch_model-00001-of-00002.bin"):
        models.load_pretrained(d)
    assert not marker.exists()


def test_safetensors_beside_a_pickle_loads_the_safetensors(hf_dir, tmp_path):
    d = tmp_path / "both"
    shutil.copytree(hf_dir, d)
    marker = tmp_path / "UNPICKLED"
    with open(d / "pytorch_model.bin", "wb") as f:
        pickle.dump(_Payload(str(marker)), f)
    spec, _ = models.load_pretrained(d)
    assert spec.model_type == "llama" and not marker.exists()


def test_model_config_auto_map_is_not_imported(hf_dir, tmp_path):
    d = tmp_path / "custom_model"
    shutil.copytree(hf_dir, d)
    marker = tmp_path / "MODEL_CODE_RAN"
    (d / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w')\n")
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (d / "config.json").write_text(json.dumps(cfg))
    spec, _ = models.load_pretrained(d)  # jaxrlhf's own implementation of the named family
    assert spec.model_type == "llama" and not marker.exists()


def _custom_tokenizer(tmp_path, tokenizer_class):
    src = _tokenizers.train_sentencepiece(tmp_path, "llama")
    d = tmp_path / f"custom_tok_{tokenizer_class}"
    shutil.copytree(src, d)
    marker = tmp_path / "TOKENIZER_CODE_RAN"
    (d / "tokenization_evil.py").write_text(
        f"open({str(marker)!r}, 'w')\n"
        "from transformers import LlamaTokenizer\n\n\nclass EvilTokenizer(LlamaTokenizer):\n    pass\n"
    )
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    if tokenizer_class is None:
        cfg.pop("tokenizer_class", None)
    else:
        cfg["tokenizer_class"] = tokenizer_class
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return str(d), marker


@pytest.mark.parametrize("tokenizer_class", ["EvilTokenizer", None])
def test_tokenizer_auto_map_refused_without_a_prompt(tmp_path, no_prompt, tokenizer_class):
    path, marker = _custom_tokenizer(tmp_path, tokenizer_class)
    with pytest.raises(data.DataError) as e:
        data.load_tokenizer(path)
    msg = str(e.value)
    assert "tokenizer_config.json" in msg and "tokenization_evil.EvilTokenizer" in msg
    assert "trust_remote_code" in msg
    assert no_prompt == [] and not marker.exists()


def test_tokenizer_auto_map_with_a_builtin_class_loads_the_builtin(tmp_path, no_prompt):
    path, marker = _custom_tokenizer(tmp_path, "LlamaTokenizer")
    tok = data.load_tokenizer(path)
    assert tok.encode("a b") and no_prompt == [] and not marker.exists()


def test_tokenizer_remote_code_runs_only_when_turned_on(tmp_path, no_prompt):
    path, marker = _custom_tokenizer(tmp_path, "EvilTokenizer")
    tok = data.load_tokenizer(path, trust_remote_code=True)
    assert type(tok.hf).__name__ == "EvilTokenizer" and marker.exists() and no_prompt == []


def test_yaml_is_safe_loaded(tmp_path):
    marker = tmp_path / "YAML_CODE_RAN"
    cfg = tmp_path / "evil.yaml"
    cfg.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\ndata:\n  path: x.jsonl\n")
    with pytest.raises(ConfigError, match=r"evil\.yaml: invalid YAML"):
        load_config(SFTConfig, cfg)
    evil = f"!!python/object/apply:os.system ['touch {marker}']"
    cfg = load_config(SFTConfig, None, ["data.path=x.jsonl", f"name={evil}"])
    assert cfg.name == evil  # a --set value that is not safe YAML stays the literal text
    assert not marker.exists()


def test_chat_template_cannot_reach_python(tmp_path):
    tok = data.load_tokenizer(_tokenizers.train_sentencepiece(tmp_path, "llama"))
    tok.chat_template = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(Exception, match="unsafe|access|attribute"):
        tok.render_chat([{"role": "user", "content": "hi"}])
