"""``jaxrlhf export``: a stage checkpoint -> a merged HF directory (transformers' logits = ours) or a PEFT
adapter directory (peft on the base = the merged model), and a reward model -> its sequence classifier."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
import transformers  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from jaxrlhf import cli, data, lora, models, train  # noqa: E402

IDS = np.array([[1, 45, 67, 89, 12, 33, 7, 101]])


def _hf_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(torch.from_numpy(IDS).long()).logits.numpy()


def _causal_lm(path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)


def test_full_checkpoint_exports_a_merged_hf_dir(tiny_sft, tmp_path, capsys):
    out = tmp_path / "hf"
    assert cli.main(["export", "--checkpoint", tiny_sft.stage_dir, "--out", str(out)]) == 0
    assert f"exported {tiny_sft.stage_dir} -> {out} (hf)" in capsys.readouterr().out
    ckpt = train.load_stage(tiny_sft.stage_dir)
    ours = np.asarray(models.forward(ckpt.spec, ckpt.params, IDS).logits)
    np.testing.assert_allclose(_hf_logits(_causal_lm(out)), ours, atol=2e-4, rtol=2e-4)
    tok, saved = data.load_tokenizer(str(out)), data.load_tokenizer(ckpt.tokenizer_dir)
    text = "What is 2 + 3? Sure! 2 + 3 = 5."
    assert tok.encode(text) == saved.encode(text) and tok.pad_token_id == saved.pad_token_id
    # user errors: one message, exit status 2
    assert cli.main(["export", "--checkpoint", tiny_sft.stage_dir, "--out", str(out)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    peft_out = str(tmp_path / "peft")
    assert (
        cli.main(["export", "--checkpoint", tiny_sft.stage_dir, "--out", peft_out, "--format", "peft"]) == 2
    )
    assert "has no LoRA adapters: use --format hf" in capsys.readouterr().err
    assert cli.main(["export", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "not a stage checkpoint" in capsys.readouterr().err


def test_lora_checkpoint_exports_peft_and_merged(tiny_sft, tmp_path):
    """A LoRA stage checkpoint (adapters with nonzero B over the SFT base): its PEFT export applied by peft to
    the HF base and its merged export both give the logits of the unmerged adapters in jaxrlhf."""
    ckpt = train.load_stage(tiny_sft.stage_dir)
    cfg = lora.LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "up_proj"))
    adapters = lora.init(ckpt.spec, ckpt.params, cfg, jax.random.key(0))
    keys = iter(jax.random.split(jax.random.key(1), 64))
    adapters = jax.tree_util.tree_map_with_path(
        lambda p, x: 0.1 * jax.random.normal(next(keys), x.shape) if p[-1].key == "lora_b" else x, adapters
    )
    stage = train.save_stage(
        tmp_path / "stage", ckpt.spec, ckpt.params, lora=adapters, lora_config=cfg,
        tokenizer_dir=ckpt.tokenizer_dir, stage_info={"stage": "sft"},
    )  # fmt: skip
    models.save_pretrained(ckpt.spec, ckpt.params, str(tmp_path / "base"))
    for fmt in ("peft", "hf"):
        assert cli.main(["export", "--checkpoint", stage, "--out", str(tmp_path / fmt), "--format", fmt]) == 0
    assert json.load(open(tmp_path / "peft" / "adapter_config.json"))["r"] == 4
    want = np.asarray(models.forward(ckpt.spec, ckpt.params, IDS, lora=adapters, lora_config=cfg).logits)
    base = np.asarray(models.forward(ckpt.spec, ckpt.params, IDS).logits)
    assert np.abs(want - base).max() > 1e-2  # the adapters change the model
    np.testing.assert_allclose(_hf_logits(_causal_lm(tmp_path / "hf")), want, atol=2e-4, rtol=2e-4)
    with_peft = peft.PeftModel.from_pretrained(_causal_lm(tmp_path / "base"), str(tmp_path / "peft"))
    np.testing.assert_allclose(_hf_logits(with_peft), want, atol=2e-4, rtol=2e-4)
    assert os.path.isfile(tmp_path / "peft" / "tokenizer.json")  # the stage's tokenizer beside the adapters


def test_reward_model_exports_the_stages_classifier(tiny_rm, tmp_path):
    out = tmp_path / "rm"
    assert cli.main(["export", "--checkpoint", tiny_rm.stage_dir, "--out", str(out)]) == 0
    stage_export = os.path.join(
        tiny_rm.run_dir, "export", "hf"
    )  # what the RM stage wrote (tested in test_rm)
    got, want = (
        load_file(str(out / "model.safetensors")),
        load_file(os.path.join(stage_export, "model.safetensors")),
    )
    assert got.keys() == want.keys() and "score.weight" in got
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])
    config = json.load(open(out / "config.json"))
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["num_labels"] == 1
