"""Parity with Hugging Face transformers (PyTorch CPU) for every decoder family, and checkpoint I/O errors."""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from _hf_tiny import TINY_NAMES, hf_logits, padded_batch, tiny_hf_causal_lm

from jaxrlhf import models
from jaxrlhf.models import hf_io
from jaxrlhf.models.spec import ConfigError

_forward = jax.jit(models.forward, static_argnums=0)


def _hf_positions(name: str, mask: np.ndarray):
    # HF Llama/Mistral/GPT-2 default to arange positions; give them ours (OPT derives them from the mask,
    # BLOOM has no positions but ALiBi over the mask's cumsum)
    return None if name == "bloom" else np.maximum(np.cumsum(mask, -1) - 1, 0)


@functools.cache
def _built(name: str, root: str):
    hf, path = tiny_hf_causal_lm(name, root)
    spec, params = models.load_pretrained(path)
    return hf, path, spec, params


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hf_tiny"))


@pytest.mark.parametrize("name", TINY_NAMES)
def test_logits_match_hf_and_roundtrip(name, root, tmp_path):
    hf, _, spec, params = _built(name, root)
    rng = np.random.default_rng(1)
    ids_l, mask_l = padded_batch(rng, [12, 7, 3], 12, "left")
    ids_r, mask_r = padded_batch(rng, [12, 5, 9], 12, "right")
    ids, mask = np.concatenate([ids_l, ids_r]), np.concatenate([mask_l, mask_r])
    ref = hf_logits(hf, ids, mask, _hf_positions(name, mask))
    ours = np.asarray(_forward(spec, params, jnp.asarray(ids), jnp.asarray(mask)).logits)
    real = mask.astype(bool)
    assert ours.shape == ref.shape == (6, 12, spec.vocab_size)
    np.testing.assert_allclose(ours[real], ref[real], atol=1e-4, rtol=0)

    out_dir = tmp_path / "export"
    models.save_pretrained(spec, params, out_dir)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out_dir, attn_implementation="eager").eval()
    again = hf_logits(reloaded, ids, mask, _hf_positions(name, mask))
    np.testing.assert_array_equal(again[real], ref[real])
    assert transformers.AutoConfig.from_pretrained(out_dir).tie_word_embeddings == spec.tie_word_embeddings


def test_sliding_window_is_active(root):
    """Guard against a vacuous Mistral check: without the window the logits differ (seq 12 > window 4)."""
    _, _, spec, params = _built("mistral", root)
    assert spec.sliding_window == 4
    ids, mask = padded_batch(np.random.default_rng(2), [12], 12)
    with_w = _forward(spec, params, jnp.asarray(ids), jnp.asarray(mask)).logits
    no_w = _forward(spec.replace(sliding_window=None), params, jnp.asarray(ids), jnp.asarray(mask)).logits
    assert float(jnp.abs(with_w - no_w)[:, 4:].max()) > 1e-3
    np.testing.assert_allclose(with_w[:, :4], no_w[:, :4], atol=1e-6)


def test_bf16_checkpoint_and_sharded_save(root, tmp_path):
    hf, path = tiny_hf_causal_lm("llama3", tmp_path, dtype=torch.bfloat16)
    spec, params = models.load_pretrained(path, dtype=jnp.bfloat16)
    leaf = params["layers_0"]["attn"]["q_proj"]["kernel"]
    assert leaf.dtype == jnp.bfloat16
    ref = hf.model.layers[0].self_attn.q_proj.weight.detach().float().numpy().T
    np.testing.assert_array_equal(np.asarray(leaf, np.float32), ref)  # bit-exact bf16 transfer
    # save sharded (tiny shard limit) in bf16 and reload in f32 through transformers and through us
    out = tmp_path / "sharded"
    models.save_pretrained(spec, params, out, max_shard_size=2000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    spec2, params2 = models.load_pretrained(out)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a, np.float32), b), params, params2)
    hf2 = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    assert torch.equal(
        hf2.model.layers[0].self_attn.q_proj.weight, hf.model.layers[0].self_attn.q_proj.weight
    )


def test_base_model_checkpoint_without_prefix(root, tmp_path):
    hf, path, spec, params = _built("gpt2", root)
    hf.transformer.save_pretrained(tmp_path / "base")  # GPT2Model: names lack "transformer."
    cfg = json.loads((tmp_path / "base" / "config.json").read_text())
    assert cfg["model_type"] == "gpt2"
    _, params2 = models.load_pretrained(tmp_path / "base")
    jax.tree.map(np.testing.assert_array_equal, params, params2)


def _write(tmp_path, tensors, config):
    tmp_path.mkdir(parents=True, exist_ok=True)
    hf_io.write_safetensors(str(tmp_path / "model.safetensors"), tensors)
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def _state(path):
    from safetensors.numpy import load_file

    return load_file(os.path.join(path, "model.safetensors"))


def test_errors_name_the_problem(root, tmp_path):
    _, path, spec, _ = _built("llama2", root)
    config = json.loads(open(os.path.join(path, "config.json")).read())
    state = _state(path)

    with pytest.raises(FileNotFoundError, match="not a directory"):
        models.load_pretrained(tmp_path / "does-not-exist")

    with pytest.raises(FileNotFoundError, match="no config.json") as e:
        models.load_pretrained(tmp_path)
    assert str(tmp_path) in str(e.value)

    with pytest.raises(ConfigError, match="supported families: llama, mistral, opt, bloom, gpt2, t5"):
        models.load_pretrained(_write(tmp_path / "bad_type", state, {**config, "model_type": "gptj"}))

    missing = dict(state)
    del missing["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(
        hf_io.CheckpointError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"
    ):
        models.load_pretrained(_write(tmp_path / "missing", missing, config))

    extra = {**state, "model.layers.0.self_attn.rotary.freq": np.zeros(3, np.float32)}
    with pytest.raises(hf_io.CheckpointError, match=r"model\.safetensors: unexpected tensor .*rotary\.freq"):
        models.load_pretrained(_write(tmp_path / "extra", extra, config))

    bad = {**state, "model.layers.0.self_attn.k_proj.weight": np.zeros((16, 30), np.float32)}
    with pytest.raises(
        hf_io.CheckpointError, match=r"k_proj\.weight' has shape \(16, 30\), expected \(32, 32\)"
    ):
        models.load_pretrained(_write(tmp_path / "shape", bad, config))


def test_load_onto_mesh_is_sharded(root, tmp_path):
    from jaxrlhf import sharding

    _, path, spec, params = _built("llama2", root)
    mesh = sharding.make_mesh(fsdp=4, tensor=2)
    _, sharded = models.load_pretrained(path, mesh=mesh)
    q = sharded["layers_0"]["attn"]["q_proj"]["kernel"]
    assert not q.sharding.is_fully_replicated
    assert q.addressable_shards[0].data.shape == (32 // 4, 32 // 2)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, sharded)
    # saving gathers one tensor at a time; the files equal the original checkpoint's tensors
    models.save_pretrained(spec, sharded, tmp_path / "from_mesh")
    original, again = _state(path), _state(tmp_path / "from_mesh")
    assert set(original) == set(again)
    for k in original:
        np.testing.assert_array_equal(original[k], again[k])


def test_bf16_reader_matches_ml_dtypes(tmp_path):
    x = (np.arange(12, dtype=np.float32) / 7).astype(ml_dtypes.bfloat16).reshape(3, 4)
    hf_io.write_safetensors(str(tmp_path / "a.safetensors"), {"x": x})
    from safetensors.torch import load_file

    t = load_file(str(tmp_path / "a.safetensors"))["x"]
    assert t.dtype == torch.bfloat16
    np.testing.assert_array_equal(t.float().numpy(), x.astype(np.float32))
    np.testing.assert_array_equal(hf_io._Reader(str(tmp_path / "a.safetensors")).get("x"), x)
