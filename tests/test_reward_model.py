"""Reward model: pooling, scoring, HF *ForSequenceClassification export parity (transformers, torch CPU)."""

from __future__ import annotations

import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxrlhf import models, reward_model, sharding  # noqa: E402
from jaxrlhf.models import heads  # noqa: E402
from tests.models._hf_tiny import VOCAB, padded_batch, tiny_hf_causal_lm  # noqa: E402

LENGTHS = [9, 4, 1, 7]
T = 10

_score = jax.jit(reward_model.score, static_argnums=0)
_score_pairs = jax.jit(reward_model.score_pairs, static_argnums=0)
_hidden = jax.jit(lambda spec, p, ids, mask: models.forward(spec, p, ids, mask).hidden, static_argnums=0)


@pytest.fixture(scope="module", params=["llama2", "gpt2"])
def family(request, tmp_path_factory):
    """(name, spec, params, head with a nonzero bias, export dir) per family; the export is written once."""
    name = request.param
    tmp = tmp_path_factory.mktemp(name)
    _, path = tiny_hf_causal_lm(name, tmp)
    spec, params = models.load_pretrained(path)
    head = heads.init_head(spec, jax.random.key(1))
    head["bias"] = jnp.array([0.37], jnp.float32)
    return name, spec, params, head, str(tmp / "rm")


def _hf_scores(out_dir, ids, mask):
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out_dir, attn_implementation="eager")
    with torch.no_grad():
        out = hf(input_ids=torch.as_tensor(ids, dtype=torch.long), attention_mask=torch.as_tensor(mask))
    return hf, out.logits[:, 0].float().numpy()


def test_export_matches_transformers_sequence_classification(family):
    name, spec, params, head, out_dir = family
    rng = np.random.default_rng(0)
    ids, mask = padded_batch(rng, LENGTHS, T, side="right")  # real tokens in [3, VOCAB), pad = 0
    assert np.all(ids[mask == 1] != spec.pad_token_id)
    ours = np.asarray(_score(spec, params, head, ids, mask))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reward_model.export_hf(spec, params, head, out_dir)
    hf, theirs = _hf_scores(out_dir, ids, mask)
    assert type(hf).__name__ == reward_model.SEQ_CLS_ARCHITECTURES[spec.model_type]
    with open(os.path.join(out_dir, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["num_labels"] if "num_labels" in cfg else len(cfg["id2label"]) == 1
    if spec.model_type == "llama":
        # RMSNorm family: the bias cannot live in HF's bias-free score layer; it is recorded instead
        assert any("jaxrlhf_reward_bias" in str(w.message) for w in caught)
        np.testing.assert_allclose(cfg["jaxrlhf_reward_bias"], 0.37, rtol=1e-6)
        np.testing.assert_allclose(theirs + cfg["jaxrlhf_reward_bias"], ours, rtol=1e-4, atol=1e-4)
        # without a head bias the export is exact
        zero = dict(head, bias=jnp.zeros((1,), jnp.float32))
        reward_model.export_hf(spec, params, zero, out_dir + "_nobias")
        _, theirs = _hf_scores(out_dir + "_nobias", ids, mask)
        np.testing.assert_allclose(theirs, _score(spec, params, zero, ids, mask), rtol=1e-4, atol=1e-4)
    else:
        # LayerNorm family: the bias is folded into the final norm's bias exactly
        assert cfg["jaxrlhf_reward_bias"] == 0.0
        np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4)


def test_pooling_is_the_last_real_token_for_left_and_right_padding(family):
    _, spec, params, head, _ = family
    rng = np.random.default_rng(2)
    right_ids, right_mask = padded_batch(rng, LENGTHS, T, side="right")
    left_ids = np.zeros_like(right_ids)
    left_mask = np.zeros_like(right_mask)
    for b, n in enumerate(LENGTHS):
        left_ids[b, T - n :] = right_ids[b, :n]
        left_mask[b, T - n :] = 1
    right = np.asarray(_score(spec, params, head, right_ids, right_mask))
    left = np.asarray(_score(spec, params, head, left_ids, left_mask))
    np.testing.assert_allclose(left, right, rtol=1e-4, atol=1e-5)
    # the head applied to the hidden state of each row's last real token (index n - 1 with right padding)
    hidden = np.asarray(_hidden(spec, params, right_ids, right_mask))
    last = hidden[np.arange(len(LENGTHS)), np.array(LENGTHS) - 1]
    expected = last @ np.asarray(head["kernel"])[:, 0] + float(head["bias"][0])
    np.testing.assert_allclose(right, expected, rtol=1e-4, atol=1e-5)


def test_score_pairs_is_one_forward_over_both_halves(family):
    _, spec, params, head, _ = family
    ids, mask = padded_batch(np.random.default_rng(3), LENGTHS, T, side="right")
    cut = max(LENGTHS[2:])  # the rejected half arrives shorter and is padded up to T
    batch = {
        "chosen_input_ids": ids[:2],
        "chosen_attention_mask": mask[:2],
        "rejected_input_ids": ids[2:, :cut],
        "rejected_attention_mask": mask[2:, :cut],
    }
    rc, rr = _score_pairs(spec, params, head, batch)
    swapped = np.asarray(_score(spec, params, head, ids[::-1], mask[::-1]))[::-1]  # rows in another order
    np.testing.assert_allclose(rc, swapped[:2], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(rr, swapped[2:], rtol=1e-4, atol=1e-5)


def test_head_helpers_and_axes():
    hidden = jnp.arange(2 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 3)
    mask = jnp.array([[0, 1, 1, 0], [1, 0, 0, 0]])
    np.testing.assert_array_equal(heads.last_token_index(mask), [2, 0])
    np.testing.assert_array_equal(heads.pool_last(hidden, mask), hidden[jnp.array([0, 1]), jnp.array([2, 0])])
    head = {"kernel": jnp.ones((3, 1)), "bias": jnp.array([0.5])}
    np.testing.assert_allclose(heads.token_values(head, hidden), hidden.sum(-1) + 0.5)
    mesh = sharding.make_mesh(data=1, fsdp=8, tensor=1)
    specs = jax.tree.map(
        lambda a: sharding.logical_to_spec(a, mesh), heads.head_axes(), is_leaf=lambda x: isinstance(x, tuple)
    )
    assert specs["kernel"] == jax.sharding.PartitionSpec("fsdp", None)


def test_t5_pools_the_decoder_start_position_like_hf(tmp_path):
    """T5: the reward is the head on HF's decoder state at the start token after the full (padded) input."""
    cfg = transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, dropout_rate=0.0
    )
    torch.manual_seed(0)
    hf = transformers.T5ForConditionalGeneration(cfg).eval()
    hf.save_pretrained(tmp_path / "t5")
    spec, params = models.load_pretrained(tmp_path / "t5")
    head = heads.init_head(spec, jax.random.key(4))
    ids, mask = padded_batch(np.random.default_rng(4), [6, 2, 4], 7, side="right")
    ours = np.asarray(_score(spec, params, head, ids, mask))
    with torch.no_grad():
        dec = (
            hf(
                input_ids=torch.as_tensor(ids, dtype=torch.long),
                attention_mask=torch.as_tensor(mask),
                decoder_input_ids=torch.zeros((3, 1), dtype=torch.long),
                output_hidden_states=True,
            )
            .decoder_hidden_states[-1][:, 0]
            .numpy()
        )
    np.testing.assert_allclose(ours, dec @ np.asarray(head["kernel"])[:, 0], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="T5ForSequenceClassification"):
        reward_model.export_hf(spec, params, head, tmp_path / "t5_rm")


def test_export_needs_a_pad_token(family, tmp_path):
    _, spec, params, head, _ = family
    with pytest.raises(ValueError, match="pad_token_id"):
        reward_model.export_hf(spec.replace(pad_token_id=None), params, head, tmp_path / "x")
