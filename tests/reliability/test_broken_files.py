"""Broken files: a truncated or corrupt safetensors file, index, ``config.json`` or tokenizer file is an error
that names the file and what is wrong (not a bare ``SafetensorError`` or a crash inside JAX); a full disk
(``OSError(ENOSPC)`` raised part-way through a save) leaves the previous train checkpoint, stage checkpoint
and HF export intact and loadable.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "data"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "models"))
import _tokenizers  # noqa: E402
from _hf_tiny import tiny_hf_causal_lm  # noqa: E402

from jaxrlhf import data, models, train  # noqa: E402
from jaxrlhf.models import hf_io  # noqa: E402
from jaxrlhf.models.spec import ConfigError  # noqa: E402
from jaxrlhf.train import checkpoint as ckpt_lib  # noqa: E402


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return tiny_hf_causal_lm("llama2", tmp_path_factory.mktemp("broken"))[1]


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, "No space left on device")


# ---------------------------------------------------------------------------------------------- weights


@pytest.mark.parametrize(
    "damage",
    ["truncated-data", "truncated-header", "empty", "garbage", "huge-header"],
)
def test_corrupt_safetensors_names_the_file(hf_dir, tmp_path, damage):
    d = _copy(hf_dir, tmp_path / "m")
    f = d / "model.safetensors"
    blob = f.read_bytes()
    f.write_bytes(
        {
            "truncated-data": blob[: len(blob) - 1000],
            "truncated-header": blob[:40],
            "empty": b"",
            "garbage": os.urandom(64),
            "huge-header": (1 << 40).to_bytes(8, "little") + blob[8:],
        }[damage]
    )
    with pytest.raises(hf_io.CheckpointError) as e:
        models.load_pretrained(d)
    msg = str(e.value)
    assert msg.startswith(f"{f}: ") and "truncated or corrupt" in msg and "bytes on disk" in msg


def test_broken_safetensors_index_names_the_file(hf_dir, tmp_path):
    spec, params = models.load_pretrained(hf_dir)
    d = tmp_path / "sharded"
    models.save_pretrained(spec, params, d, max_shard_size=20_000)
    index = d / "model.safetensors.index.json"
    good = index.read_text()
    shards = sorted(json.loads(good)["weight_map"].values())
    assert len(set(shards)) > 1
    index.write_text(good[: len(good) // 2])
    with pytest.raises(hf_io.CheckpointError, match=rf"{index}: invalid JSON"):
        models.load_pretrained(d)
    index.write_text('{"metadata": {}}')
    with pytest.raises(hf_io.CheckpointError, match="no 'weight_map'"):
        models.load_pretrained(d)
    index.write_text(good)
    os.remove(d / shards[-1])
    with pytest.raises(hf_io.CheckpointError, match=rf"{d / shards[-1]}: weights file missing"):
        models.load_pretrained(d)
    index.write_text(json.dumps({"weight_map": {"x": "../elsewhere.safetensors"}}))
    with pytest.raises(hf_io.CheckpointError, match="outside the directory"):
        models.load_pretrained(d)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda text, cfg: text[: len(text) // 2], "invalid JSON"),
        (lambda text, cfg: "[1, 2]", "expected a JSON object"),
        (lambda text, cfg: json.dumps({**cfg, "num_hidden_layers": "two"}), "'num_hidden_layers' must be"),
        (lambda text, cfg: json.dumps({**cfg, "hidden_size": None}), "'hidden_size' must be"),
        (lambda text, cfg: json.dumps({**cfg, "hidden_size": -4}), "'hidden_size' must be a positive"),
        (lambda text, cfg: json.dumps({**cfg, "vocab_size": 1.5}), "'vocab_size' must be a positive"),
        (lambda text, cfg: json.dumps({**cfg, "rms_norm_eps": "tiny"}), "'rms_norm_eps' must be a number"),
    ],
    ids=["truncated", "list", "str-layers", "null-hidden", "negative", "float-vocab", "str-eps"],
)
def test_broken_config_json_names_file_and_key(hf_dir, tmp_path, edit, match):
    d = _copy(hf_dir, tmp_path / "m")
    f = d / "config.json"
    text = f.read_text()
    f.write_text(edit(text, json.loads(text)))
    with pytest.raises(ConfigError, match=match) as e:
        models.load_pretrained(d)
    assert str(f) in str(e.value)


# ---------------------------------------------------------------------------------------------- tokenizers


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("broken_tok")
    return {
        "sentencepiece": _tokenizers.train_sentencepiece(root, "llama"),
        "tokenizer.json": _tokenizers.build_bpe_tokenizer_json(root),
    }


@pytest.mark.parametrize(
    ("kind", "name", "match"),
    [
        ("sentencepiece", "tokenizer_config.json", "invalid JSON"),
        ("sentencepiece", "tokenizer.model", "not a readable SentencePiece model"),
        ("tokenizer.json", "tokenizer.json", "invalid JSON"),
        ("tokenizer.json", "tokenizer_config.json", "invalid JSON"),
    ],
)
def test_truncated_tokenizer_file_names_it(tok_dirs, tmp_path, kind, name, match):
    d = _copy(tok_dirs[kind], tmp_path / "tok")
    f = d / name
    if not f.exists():
        pytest.skip(f"{kind} layout has no {name}")
    blob = f.read_bytes()
    f.write_bytes(blob[: len(blob) // 3])
    with pytest.raises(data.DataError, match=match) as e:
        data.load_tokenizer(str(d))
    assert str(e.value).startswith(f"{f}: ")


def test_tokenizer_config_not_an_object(tok_dirs, tmp_path):
    d = _copy(tok_dirs["sentencepiece"], tmp_path / "tok")
    (d / "tokenizer_config.json").write_text('"LlamaTokenizer"')
    with pytest.raises(data.DataError, match="tokenizer_config.json: expected a JSON object, got str"):
        data.load_tokenizer(str(d))


# ---------------------------------------------------------------------------------------------- full disk


def _state(value: float, step: int):
    opt = train.make_optimizer(train.OptimConfig(lr=1e-2))
    state, _ = train.init_train_state({"w": jnp.full((4, 8), value)}, opt, 0)
    return state._replace(step=jnp.asarray(step, jnp.int32))


def test_full_disk_during_a_train_checkpoint_keeps_the_previous(tmp_path, monkeypatch):
    from etils import epath

    mgr = train.CheckpointManager(tmp_path / "ck", save_interval_steps=1)
    mgr.save(_state(1.0, 1), {"step": 1})
    mgr.wait()
    with monkeypatch.context() as m:
        m.setattr(epath.Path, "write_text", _enospc)  # every metadata / JSON write of the next save fails
        with pytest.raises(OSError) as e:
            mgr.save(_state(2.0, 2), {"step": 2})
            mgr.wait()
    assert e.value.errno == errno.ENOSPC
    fresh = train.CheckpointManager(tmp_path / "ck", save_interval_steps=1)
    assert fresh.all_steps() == [1]
    state, loader = fresh.restore_latest(_state(0.0, 0))
    assert int(state.step) == 1 and loader == {"step": 1}
    np.testing.assert_array_equal(np.asarray(state.params["w"]), np.ones((4, 8)))
    fresh.close()


def _stage(hf_dir, out, params, tok):
    spec, _ = models.load_pretrained(hf_dir)
    return train.save_stage(out, spec, params, tokenizer_dir=tok, stage_info={"stage": "sft", "step": 1})


@pytest.mark.parametrize("where", ["tree", "tokenizer", "json"])
def test_full_disk_during_a_stage_save_keeps_the_previous(hf_dir, tok_dirs, tmp_path, monkeypatch, where):
    _, params = models.load_pretrained(hf_dir)
    out = tmp_path / "stage"
    _stage(hf_dir, out, params, tok_dirs["sentencepiece"])
    newer = jax.tree.map(lambda x: x + 1.0, params)
    target = {"tree": "_save_tree", "tokenizer": "shutil.copytree", "json": "_write_json"}[where]
    with monkeypatch.context() as m:
        if target == "shutil.copytree":
            m.setattr(ckpt_lib.shutil, "copytree", _enospc)
        else:
            m.setattr(ckpt_lib, target, _enospc)
        with pytest.raises(OSError):
            _stage(hf_dir, out, newer, tok_dirs["sentencepiece"])
    got = train.load_stage(out)
    chex.assert_trees_all_equal(jax.device_get(got.params), jax.device_get(params))
    assert got.stage_info == {"stage": "sft", "step": 1} and got.tokenizer_dir is not None
    # the next save replaces the partial stage.tmp and succeeds
    _stage(hf_dir, out, newer, tok_dirs["sentencepiece"])
    chex.assert_trees_all_equal(jax.device_get(train.load_stage(out).params), jax.device_get(newer))
    assert not os.path.exists(f"{out}.tmp")


def test_full_disk_during_an_hf_export_keeps_the_previous_file(hf_dir, tmp_path, monkeypatch):
    spec, params = models.load_pretrained(hf_dir)
    out = tmp_path / "export"
    models.save_pretrained(spec, params, out)
    real_open = open

    class _Full:
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, b):
            self.n += len(b)
            if self.n > 4096:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(b)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

    monkeypatch.setattr(
        hf_io, "open", lambda p, mode="r", *a, **k: _Full(real_open(p, mode, *a, **k)), raising=False
    )
    with pytest.raises(OSError):
        models.save_pretrained(spec, jax.tree.map(lambda x: x * 2.0, params), out)
    monkeypatch.undo()
    assert [n for n in os.listdir(out) if ".tmp" in n] == []
    _, again = models.load_pretrained(out)
    chex.assert_trees_all_equal(jax.device_get(again), jax.device_get(params))


# ---------------------------------------------------------------------------------------------- checkpoints


def test_corrupt_train_checkpoint_names_the_step(tmp_path):
    mgr = train.CheckpointManager(tmp_path / "ck", save_interval_steps=1, async_save=False)
    mgr.save(_state(1.0, 1), {"step": 1})
    mgr.close()
    for root, _, files in os.walk(tmp_path / "ck" / "1" / "state"):
        for name in files:
            p = os.path.join(root, name)
            with open(p, "r+b") as f:
                f.truncate(os.path.getsize(p) // 2)
    fresh = train.CheckpointManager(tmp_path / "ck", save_interval_steps=1)
    with pytest.raises(Exception, match=str(tmp_path / "ck" / "1")):
        fresh.restore_latest(_state(0.0, 0))


def test_corrupt_stage_checkpoint_names_the_file(hf_dir, tok_dirs, tmp_path):
    _, params = models.load_pretrained(hf_dir)
    out = tmp_path / "stage"
    _stage(hf_dir, out, params, tok_dirs["sentencepiece"])
    spec_file = out / "spec.json"
    spec_file.write_text(spec_file.read_text()[:20])
    with pytest.raises(Exception, match=str(spec_file)):
        train.load_stage(out)
