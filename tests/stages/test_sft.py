"""The SFT stage on the bundled tiny task (shortened embedded default) on 8 fake CPU devices.

A from-scratch tiny Llama trains for 20 steps, stops, and a second run of the same directory resumes from its
Orbax checkpoint to 40 steps: the eval loss must end well below its initial value (about log V = 5.77), and
the run must leave a stage checkpoint, a transformers-loadable export with the same logits and samples scored
by the rule. A LoRA run starts from that run's HF export and exports adapters that peft loads with the same
logits as the merged export. A tiny T5 trains on the same data through the seq2seq path.
"""

from __future__ import annotations

import json
import math
import os

import jax
import numpy as np
import pytest

from jaxrlhf import models, train
from jaxrlhf.config import load_config
from jaxrlhf.stages import sft

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny", "sft.yaml")
STEPS = 40


def shared_dirs(tmp_path_factory) -> list[str]:
    base = tmp_path_factory.getbasetemp()
    return [f"tokenizer.cache_dir={base / 'tiny_tokenizer'}", f"data.cache_dir={base / 'tiny_data_cache'}"]


def tiny_config(out, tmp_path_factory, *extra: str) -> sft.SFTConfig:
    overrides = [
        f"output_dir={out}",
        f"optim.total_steps={STEPS}",
        "optim.warmup_steps=5",
        "train.eval_every=20",
        "train.log_every=10",
        "checkpoint.every=20",
        "train.progress=false",
        "samples.num=16",
        *shared_dirs(tmp_path_factory),
        *extra,
    ]
    return load_config(sft.SFTConfig, TINY, overrides)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sft_full")
    half = STEPS // 2
    first = sft.run(
        tiny_config(
            out,
            tmp_path_factory,
            f"optim.total_steps={half}",
            "samples.num=0",
            "export.hf=false",
            "optim.warmup_steps=5",
        )
    )
    assert first.first_eval and train.load_stage(first.stage_dir).stage_info["step"] == half
    # the second run finds the step-20 checkpoint and continues (a longer schedule, as when a user raises
    # optim.total_steps of a finished run); bitwise resume equality is tested with the checkpoint manager
    second = sft.run(tiny_config(out, tmp_path_factory))
    return first, second


def test_eval_loss_drops_across_resume(full_run):
    first, second = full_run
    assert not second.first_eval  # resumed at step 20: no step-0 eval
    start, end = first.first_eval["loss"], second.eval_metrics["loss"]
    assert start > 0.95 * math.log(320)  # a fresh model is near uniform over the 320 ids
    assert end < 0.5 * start and end < 2.8, (start, end)
    assert second.eval_metrics["ppl"] == pytest.approx(math.exp(end), rel=1e-5)
    records = read_jsonl(os.path.join(second.run_dir, "metrics.jsonl"))
    assert [r["step"] for r in records if "eval/loss" in r] == [0, 20, STEPS]
    assert [r["step"] for r in records if "loss" in r] == [10, 20, 30, 40]
    assert sorted(int(d) for d in os.listdir(os.path.join(second.run_dir, "checkpoints"))) == [20, 40]


def test_outputs_and_stage_checkpoint(full_run):
    result = full_run[1]
    run_dir = result.run_dir
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "samples.jsonl",
        "stage/stage.json",
        "export/hf/config.json",
    ):
        assert os.path.isfile(os.path.join(run_dir, name)), name
    assert load_config(sft.SFTConfig, os.path.join(run_dir, "config.yaml")).optim.total_steps == STEPS
    assert result.stage_dir == os.path.join(run_dir, "stage")
    ckpt = train.load_stage(result.stage_dir)
    assert ckpt.stage_info["stage"] == "sft" and ckpt.stage_info["step"] == STEPS
    assert ckpt.spec.vocab_size == 320 and ckpt.lora is None
    assert os.path.isfile(os.path.join(ckpt.tokenizer_dir, "tokenizer_config.json"))
    samples = read_jsonl(os.path.join(run_dir, "samples.jsonl"))
    assert len(samples) == 16
    from jaxrlhf.assets import tiny

    for s in samples:  # scores in the file are the rule applied to the decoded text
        assert s["rule_score"] == tiny.check(s["prompt"], s["completion"])
    assert result.samples["rule_score"] == pytest.approx(np.mean([s["rule_score"] for s in samples]))


def test_hf_export_matches_transformers(full_run):
    torch = pytest.importorskip("torch")
    import transformers

    result = full_run[1]
    ckpt = train.load_stage(result.stage_dir)
    hf_dir = os.path.join(result.run_dir, "export", "hf")
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    ids = np.asarray([tok.encode("What is 3 + 4? Sure! 3 + 4 = 7. Hope this helps!")], np.int32)
    ours = np.asarray(models.forward(ckpt.spec, ckpt.params, ids).logits)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(torch.from_numpy(ids).long()).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=2e-4, rtol=2e-4)


def test_lora_from_hf_directory_exports_peft(full_run, tmp_path_factory):
    """LoRA on the HF export of the full run (models.load_pretrained + the directory's tokenizer): the base
    stays frozen, and peft applies the exported adapters to that base with the logits of the merged export."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    import chex
    import transformers

    out = tmp_path_factory.mktemp("sft_lora")
    base_dir = os.path.join(full_run[1].run_dir, "export", "hf")
    cfg = tiny_config(
        out,
        tmp_path_factory,
        f"model.path={base_dir}",
        "model.spec=null",
        "tokenizer.path=null",
        "lora.rank=4",
        "lora.alpha=8",
        "lora.targets=[q_proj, v_proj, up_proj]",
        "optim.total_steps=4",
        "optim.lr=1e-2",
        "optim.warmup_steps=0",
        "train.eval_every=0",
        "samples.num=0",
    )
    result = sft.run(cfg)
    ckpt = train.load_stage(result.stage_dir)
    chex.assert_trees_all_equal(ckpt.params, train.load_stage(full_run[1].stage_dir).params)  # frozen base
    assert ckpt.lora_config.rank == 4 and ckpt.stage_info["stage"] == "sft"
    assert float(jax.numpy.abs(ckpt.lora["layers_0"]["attn"]["q_proj"]["lora_b"]).max()) > 0  # trained
    ids = torch.tensor([[1, 45, 67, 89, 12, 33, 7]])
    with torch.no_grad():
        merged = transformers.AutoModelForCausalLM.from_pretrained(
            str(out / "export" / "hf"), dtype=torch.float32
        )
        want = merged.eval()(ids).logits.numpy()
        base_hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        got = peft.PeftModel.from_pretrained(base_hf, str(out / "export" / "peft")).eval()(ids).logits.numpy()
    assert np.abs(want - np.asarray(models.forward(ckpt.spec, ckpt.params, ids.numpy()).logits)).max() > 1e-3
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=2e-4)


def test_t5_from_scratch_seq2seq(tmp_path_factory):
    """T5 trains on prompt -> completion as inputs -> targets; the eval loss goes down in a few steps."""
    out = tmp_path_factory.mktemp("sft_t5")
    cfg = tiny_config(
        out,
        tmp_path_factory,
        "model.spec=null",
        "data.packing=false",
        "data.max_length=32",
        "model.hf_config={model_type: t5, d_model: 32, d_kv: 8, d_ff: 64, num_layers: 1, num_heads: 4, "
        "feed_forward_proj: gated-gelu, tie_word_embeddings: false}",
        "optim.total_steps=12",
        "optim.lr=1e-2",
        "optim.warmup_steps=0",
        "train.eval_every=0",
        "train.eval_batches=2",
        "samples.num=2",
        "export.hf=false",
    )
    result = sft.run(cfg)
    assert result.eval_metrics["loss"] < 0.75 * result.first_eval["loss"], (
        result.first_eval,
        result.eval_metrics,
    )
    assert train.load_stage(result.stage_dir).spec.is_encoder_decoder
    assert len(read_jsonl(os.path.join(result.run_dir, "samples.jsonl"))) == 2
