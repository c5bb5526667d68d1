"""The DPO stage on the bundled tiny comparisons, from a short tiny SFT stage, on 8 fake CPU devices.

The policy must learn the raters' preferences (held-out implicit-reward accuracy >= 0.8) and its
temperature-1 samples must score higher under the task's ground-truth rule (which training never sees) than
the SFT policy's, same prompts and sampling key. The run leaves a stage checkpoint that ``jaxrlhf generate``
loads, a HF export that transformers scores with the same logits, and a reference cache holding the SFT
policy's log-probs. LoRA with the reference on the fly (the base without adapters) resumes exactly; T5 reads
the pairs exactly as the seq2seq format does and trains; bad preference rows are named by file and row.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os

import jax
import numpy as np
import pytest

from jaxrlhf import data, losses, models, train
from jaxrlhf.config import load_config
from jaxrlhf.stages import dpo
from tests.stages._compile_cache import module_compile_cache  # noqa: F401  (autouse: reruns load)

pytestmark = pytest.mark.slow  # a 150-step DPO run on the session's tiny SFT stage, and a few short ones

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DPO_YAML = os.path.join(ROOT, "configs", "tiny", "dpo.yaml")
DPO_STEPS, SAMPLES = 150, 128


@pytest.fixture(scope="module")
def sft_run(tiny_sft):
    return tiny_sft  # tests/stages/conftest.py: the session's short (100-step) tiny SFT stage


def _dpo_config(out, model_path, tmp_path_factory, *extra: str) -> dpo.DPOConfig:
    overrides = [
        f"output_dir={out}", f"model.path={model_path}", "train.progress=false", "train.tensorboard=false",
        f"data.cache_dir={tmp_path_factory.getbasetemp() / 'tiny_data_cache'}", *extra,
    ]  # fmt: skip
    return load_config(dpo.DPOConfig, DPO_YAML, overrides)


@pytest.fixture(scope="module")
def sft_samples(sft_run, tmp_path_factory):
    """The SFT policy's samples with the DPO run's sampling config, prompts and key (the runner's
    ``fold(3)`` of ``train.seed``)."""
    from jaxrlhf import sharding
    from jaxrlhf.stages.samples import write_samples

    cfg = _dpo_config(
        tmp_path_factory.mktemp("unused"), sft_run.stage_dir, tmp_path_factory, f"samples.num={SAMPLES}"
    )
    mesh = sharding.make_mesh(cfg.train.mesh.data, cfg.train.mesh.fsdp, cfg.train.mesh.tensor)
    ckpt = train.load_stage(sft_run.stage_dir, mesh=mesh)
    tok = data.load_tokenizer(ckpt.tokenizer_dir)
    dcfg = dataclasses.replace(cfg.data, path=dpo.common.resolve_path(cfg.data.path))
    rng = jax.random.fold_in(jax.random.PRNGKey(cfg.train.seed), 3)
    out = tmp_path_factory.mktemp("sft_samples")
    return write_samples(cfg.samples, str(out), ckpt.spec, ckpt.params, None, None, tok, dcfg, mesh, rng)


@pytest.fixture(scope="module")
def full_run(sft_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo_full")
    cfg = _dpo_config(out, sft_run.stage_dir, tmp_path_factory, f"samples.num={SAMPLES}")
    assert cfg.optim.total_steps == DPO_STEPS and cfg.samples.sampling.temperature == 1.0
    return dpo.run(cfg)


def _read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_learns_preferences_and_beats_the_sft_policy(full_run, sft_samples):
    first, last = full_run.first_eval, full_run.eval_metrics
    # at step 0 the policy is the reference: zero implicit rewards, sigmoid loss log 2 (+ the RPO NLL term)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-5) and first["rewards/accuracies"] == 0.0
    assert first["loss"] == pytest.approx(np.log(2) + first["nll"], rel=1e-4)
    assert last["rewards/accuracies"] >= 0.8 and last["rewards/margins"] > 0.2, last
    assert last["logps/chosen"] > first["logps/chosen"] - 0.5  # RPO keeps the chosen answers likely
    assert last["logps/rejected"] < first["logps/rejected"] - 1.0
    before, after = sft_samples, full_run.samples
    assert before["num"] == after["num"] == SAMPLES
    assert after["rule_score"] >= before["rule_score"] + 0.12, (before, after)
    assert after["polite"] > before["polite"] + 0.2, (before, after)
    records = train.read_jsonl(os.path.join(full_run.run_dir, "metrics.jsonl"))
    assert [r["step"] for r in records if "eval/loss" in r] == [0, 50, 100, 150]
    keys = {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"}
    assert keys | {"logps/chosen", "logps/rejected", "grad_norm"} <= set(records[1]), records[1]


def test_stage_checkpoint_export_and_generate(full_run, tmp_path):
    from jaxrlhf.stages.generate_cmd import run_generate

    ckpt = train.load_stage(full_run.stage_dir)
    assert ckpt.stage_info["stage"] == "dpo" and ckpt.stage_info["step"] == DPO_STEPS and ckpt.lora is None
    out = tmp_path / "gen.jsonl"
    prompts = ["What is 2 + 3?", "What is 9 - 4?"]
    argv = ["--checkpoint", full_run.stage_dir, "--output", str(out), "--temperature", "0"]
    run_generate([*argv, "--max-new-tokens", "20", *sum((["--prompt", p] for p in prompts), [])])
    rows = _read_jsonl(out)
    assert [r["prompt"] for r in rows] == prompts and all(r["completion"] for r in rows)
    torch = pytest.importorskip("torch")
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(full_run.run_dir, "export", "hf"))
    tok = data.load_tokenizer(os.path.join(full_run.run_dir, "export", "hf"))
    ids = np.asarray([[*tok.prefix_ids, *tok.encode("What is 2 + 3? Sure! 2 + 3 = 5.")]], np.int32)
    want = models.forward(ckpt.spec, ckpt.params, ids, np.ones_like(ids)).logits
    with torch.no_grad():
        got = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(got, np.asarray(want), atol=2e-4, rtol=2e-4)


def test_reference_cache_holds_the_sft_policy_logprobs(full_run, sft_run):
    """The precomputed reference = summed completion log-probs under the SFT weights, recomputed here
    from a plain forward pass for some held-out pairs (the split rebuilt from the run's config)."""
    files = sorted(glob.glob(os.path.join(full_run.run_dir, "reference", "*.npy")))
    assert [os.path.basename(f).split("-")[0] for f in files] == ["eval", "train"]
    ref = np.load(files[0])
    cfg = load_config(dpo.DPOConfig, os.path.join(full_run.run_dir, "config.yaml"))
    ckpt = train.load_stage(sft_run.stage_dir)
    tok = data.load_tokenizer(ckpt.tokenizer_dir)
    dcfg = dataclasses.replace(cfg.data, path=dpo.common.resolve_path(cfg.data.path))
    ds = data.build_dataset(dcfg, tok, "preference").eval
    assert ref.shape == (len(ds.data), 2)
    batch = data.collate([ds.data[i] for i in range(8)], ds)
    for j, side in enumerate(("chosen", "rejected")):
        ids, attn = batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"]
        logits = models.forward(ckpt.spec, ckpt.params, ids, attn).logits[:, :-1]
        lp = np.asarray(losses.token_logprobs(logits, ids[:, 1:]))
        want = np.sum(lp * batch[f"{side}_loss_mask"][:, 1:], axis=1)
        np.testing.assert_allclose(ref[:8, j], want, rtol=1e-4, atol=1e-4)


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
