"""The DPO stage on the bundled tiny comparisons, on 8 fake CPU devices.

LoRA with the reference on the fly (the base without adapters) resumes exactly; T5 reads the pairs exactly as
the seq2seq format does and trains; bad preference rows are named by file and row.

The 150-step DPO run of configs/tiny/dpo.yaml on the short (100-step) tiny SFT stage (preferences learnt,
samples beat the SFT policy's under the rule, stage checkpoint / generate / HF export, reference cache) is
checked in tests/stages/test_pipeline.py, on the pipeline's SFT -> DPO chain: its SFT and DPO sections are
exactly those runs (same configs; same metrics and samples, byte for byte), so that run is made once.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from jaxrlhf import data, losses, models, train
from jaxrlhf.config import load_config
from jaxrlhf.stages import dpo
from tests.stages._compile_cache import module_compile_cache  # noqa: F401  (autouse: reruns load)

pytestmark = pytest.mark.slow  # a few short DPO runs (LoRA resume, T5)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DPO_YAML = os.path.join(ROOT, "configs", "tiny", "dpo.yaml")


@pytest.fixture(scope="module")
def sft_run(tiny_sft):
    return tiny_sft  # tests/stages/conftest.py: the session's short (100-step) tiny SFT stage


def _dpo_config(out, model_path, tmp_path_factory, *extra: str) -> dpo.DPOConfig:
    overrides = [
        f"output_dir={out}", f"model.path={model_path}", "train.progress=false", "train.tensorboard=false",
        f"data.cache_dir={tmp_path_factory.getbasetemp() / 'tiny_data_cache'}", *extra,
    ]  # fmt: skip
    return load_config(dpo.DPOConfig, DPO_YAML, overrides)


TINY_SPEC = (
    "model.spec={model_type: llama, hidden_size: 32, num_layers: 1, num_heads: 2, num_kv_heads: 1, "
    "head_dim: 16, intermediate_size: 64, max_position_embeddings: 64}"
)


def test_lora_reference_on_the_fly_resumes_exactly(tmp_path_factory):
    """LoRA adapters over a (small, random) base, the reference = the base without adapters; 2 steps +
    resume to 4 equals 4 uninterrupted steps (adapters, optimizer, loader position, logged losses)."""
    tok_cache = tmp_path_factory.getbasetemp() / "tiny_tokenizer"
    common = [
        TINY_SPEC, "tokenizer.path=tiny", f"tokenizer.cache_dir={tok_cache}",
        "lora.rank=4", "lora.alpha=8", "train.reference=on_the_fly", "optim.schedule=constant",
        "optim.warmup_steps=0", "optim.lr=1e-3", "data.batch_size=8", "train.log_every=1",
        "train.eval_every=1000", "train.eval_batches=2", "samples.num=0", "export.hf=false",
        "checkpoint.every=2",
    ]  # fmt: skip
    a_dir, b_dir = tmp_path_factory.mktemp("dpo_lora_a"), tmp_path_factory.mktemp("dpo_lora_b")
    a = dpo.run(_dpo_config(a_dir, "null", tmp_path_factory, *common, "optim.total_steps=4"))
    assert a.first_eval["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # b = 0: policy = reference
    dpo.run(_dpo_config(b_dir, "null", tmp_path_factory, *common, "optim.total_steps=2"))
    b = dpo.run(_dpo_config(b_dir, "null", tmp_path_factory, *common, "optim.total_steps=4"))
    assert not b.first_eval  # resumed
    ka, kb = train.load_stage(a.stage_dir), train.load_stage(b.stage_dir)
    assert ka.lora is not None and ka.stage_info["step"] == kb.stage_info["step"] == 4
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), ka.lora, kb.lora)

    def losses_of(run_dir):
        records = train.read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
        return {r["step"]: r["loss"] for r in records if "loss" in r}

    loss_a, loss_b = losses_of(a.run_dir), losses_of(b.run_dir)
    assert sorted(loss_b) == sorted(loss_a) == [1, 2, 3, 4]
    np.testing.assert_allclose([loss_b[s] for s in range(1, 5)], [loss_a[s] for s in range(1, 5)], rtol=1e-6)
    assert os.path.isfile(os.path.join(b.run_dir, "export", "peft", "adapter_config.json"))


T5_CONFIG = (
    "model.hf_config={model_type: t5, d_model: 32, d_kv: 8, d_ff: 64, num_layers: 1, num_heads: 4, "
    "feed_forward_proj: gated-gelu, tie_word_embeddings: false}"
)


def test_t5_reads_pairs_as_seq2seq_and_trains(tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo_t5")
    overrides = [
        T5_CONFIG, "tokenizer.path=tiny", "train.reference=on_the_fly", "train.rpo_alpha=0",
        "data.max_length=32", "optim.total_steps=8", "optim.lr=1e-2", "optim.warmup_steps=0",
        "train.eval_every=0", "train.eval_batches=2", "samples.num=0", "export.hf=false",
        f"tokenizer.cache_dir={tmp_path_factory.getbasetemp() / 'tiny_tokenizer'}",
    ]  # fmt: skip
    result = dpo.run(_dpo_config(out, "null", tmp_path_factory, *overrides))
    assert result.first_eval["loss"] == pytest.approx(np.log(2), rel=1e-5)
    m = result.eval_metrics
    assert m["loss"] < 0.65 and m["rewards/accuracies"] > 0.6, m
    ckpt = train.load_stage(result.stage_dir)
    assert ckpt.spec.is_encoder_decoder
    # log-probs of the pairs == the seq2seq format's (prompt -> inputs, response -> targets) on the same rows
    tok = data.load_tokenizer(ckpt.tokenizer_dir)
    rows = [
        {"prompt": "What is 2 + 3?", "chosen": "Sure! 2 + 3 = 5.", "rejected": "2 + 3 = 1"},
        {"prompt": "What is 9 - 4?", "chosen": "9 - 4 = 5", "rejected": "Sure! 9 - 4 = 13. Hope this helps!"},
    ]

    def dataset(name, rows, kind):
        path = out / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        dcfg = data.DataConfig(path=str(path), max_length=32, cache_dir=str(out / "c"))
        return data.build_dataset(dcfg, tok, kind)

    pref = dataset("pairs.jsonl", rows, "preference")
    batch, _ = next(dpo._padded_batches(pref, 2))
    logps, counts = dpo.pair_logps(ckpt.spec, ckpt.params, batch, prefix_len=len(tok.prefix_ids))
    for j, side in enumerate(("chosen", "rejected")):
        s2s = dataset(
            f"{side}.jsonl", [{"prompt": r["prompt"], "completion": r[side]} for r in rows], "seq2seq"
        )
        b = data.collate([s2s.data[i] for i in range(2)], s2s)
        o = models.forward(
            ckpt.spec, ckpt.params, b["input_ids"], b["attention_mask"],
            decoder_input_ids=b["decoder_input_ids"], decoder_attention_mask=b["decoder_attention_mask"],
        )  # fmt: skip
        want = np.sum(np.asarray(losses.token_logprobs(o.logits, b["labels"])) * b["loss_mask"], axis=1)
        np.testing.assert_allclose(np.asarray(logps)[2 * j : 2 * j + 2], want, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(counts)[2 * j : 2 * j + 2], b["loss_mask"].sum(1))


def test_bad_preference_rows_are_named(sft_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo_bad")
    rows = [{"prompt": "What is 1 + 1?", "chosen": "1 + 1 = 2", "rejected": "1 + 1 = 0"}] * 3
    rows[2] = {"chosen": "Sure! 1 + 1 = 2. Hope this helps!", "rejected": "1 + 1 = 0"}  # no prompt at all
    path = out / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _dpo_config(out, sft_run.stage_dir, tmp_path_factory, f"data.path={path}", "data.eval_fraction=0")
    with pytest.raises(data.DataError) as e:
        dpo.run(cfg)
    assert (e.value.file, e.value.row, e.value.field) == (str(path), 2, "prompt")
    assert f"{path}, row 2, field 'prompt'" in str(e.value)
