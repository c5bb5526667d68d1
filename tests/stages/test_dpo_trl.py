"""DPO against TRL's own DPOTrainer (trl 1.16, torch CPU), run in the test.

A tiny random Llama is built and saved with transformers, loaded into jaxrlhf with ``models.load_pretrained``;
both sides train it from the same weights on the same preference pairs with plain SGD (fixed lr, no warm-up,
no clipping, no dropout, one batch = all pairs, so the data order cannot matter). TRL's per-step logged
metrics (computed by its trainer before each update) must equal jaxrlhf's step metrics at steps 1 and 2:
loss, mean chosen / rejected log-probs, implicit reward margins and the gradient norm, for ``sigmoid`` (with
the reference log-probs precomputed on both sides) and ``ipo`` (reference on the fly: TRL reloads the
reference model from disk, jaxrlhf keeps a frozen copy), plus RPO (TRL's ``["sigmoid", "sft"]`` losses).
Both sides tokenise the pairs identically (checked).
"""

from __future__ import annotations

import json
import os
import sys

import jax
import numpy as np
import pytest

from jaxrlhf import data, models, sharding
from jaxrlhf import train as train_lib
from jaxrlhf.stages import dpo, runner

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "data"))
import _tokenizers  # noqa: E402

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")

pytestmark = pytest.mark.slow  # about 40 s on 2 cores (three short TRL runs)

PAIRS = [
    ("What is two plus two?", " four.", " five is the answer."),
    ("Hello world!", " Hello to you.", " no"),
    ("The quick brown fox", " jumps over the lazy dog.", " sleeps."),
    ("Numbers 0 1 2", " 3 4 5", " 9 8 7 6 5"),
    ("A reward model scores answers;", " the policy learns.", " the dog sleeps, the fox jumps."),
    ("User: hi", " Assistant: hello!", " bye"),
    ("translate", " bonjour", " hello world, this is a tiny corpus"),
    ("Packing puts several short examples", " into one row.", " nowhere"),
]
LR, BETA = 0.5, 0.1
METRICS = ("loss", "logps/chosen", "logps/rejected", "rewards/chosen", "rewards/rejected", "rewards/margins")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo_trl")
    tok_dir = _tokenizers.train_sentencepiece(root, "llama")
    hf_tok = __import__("transformers").AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(0)
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(hf_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
        bos_token_id=hf_tok.bos_token_id, eos_token_id=hf_tok.eos_token_id, attention_dropout=0.0,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger weights than the default init: log-probs far from uniform, big gradients
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model_dir = str(root / "model")
    model.save_pretrained(model_dir)
    hf_tok.save_pretrained(model_dir)
    rows = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS]
    path = root / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, model_dir, rows, str(path)


def run_trl(model_dir, rows, out_dir, loss_type, precompute, loss_weights=None):
    import datasets
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    args = trl.DPOConfig(
        output_dir=str(out_dir), per_device_train_batch_size=len(rows), max_steps=2, learning_rate=LR,
        optim="sgd", lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1e9,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0, beta=BETA,
        loss_type=loss_type, loss_weights=loss_weights, precompute_ref_log_probs=precompute,
        disable_dropout=True, max_length=None, dataloader_drop_last=False, bf16=False, fp16=False,
    )  # fmt: skip
    trainer = trl.DPOTrainer(
        model=model, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer
    )
    tokenized = trainer.train_dataset
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h and "step" in h]
    assert [h["step"] for h in logs] == [1, 2]
    return logs, tokenized


def run_jaxrlhf(model_dir, path, loss_type, reference, rpo_alpha=0.0):
    spec, params = models.load_pretrained(model_dir)
    tok = data.load_tokenizer(model_dir)
    dcfg = data.DataConfig(path=path, max_length=64, shuffle=False, batch_size=len(PAIRS))
    ds = data.build_dataset(dcfg, tok, "preference")
    mesh = sharding.make_mesh(1, -1, 1)  # 8 fake devices: the 8 pairs are sharded over the batch axis
    cfg = dpo.DPOConfig(
        data=dcfg,
        train=dpo.DPOTrainConfig(beta=BETA, loss_type=loss_type, reference=reference, rpo_alpha=rpo_alpha),
    )
    frozen = None
    shape = dpo.pair_shape(ds)  # as dpo.run: each pair one shared-prompt row [prompt | chosen | rejected]
    assert shape.length < 2 * shape.virtual  # the prompt is in the row once
    if reference == "precompute":
        ds = dpo.precompute_reference(spec, params, ds, len(PAIRS), mesh, shape=shape)
    else:
        frozen = jax.tree.map(np.array, params)  # the frozen reference copy
    batch, _ = next(dpo._padded_batches(ds, len(PAIRS)))
    batch = runner.global_from_full(batch, mesh)
    opt = train_lib.make_optimizer(
        train_lib.OptimConfig(name="sgd", lr=LR, schedule="constant", clip_norm=None, weight_decay=0.0)
    )
    state, _ = train_lib.init_train_state(params, opt, 0)
    step = jax.jit(train_lib.make_train_step(dpo.make_loss_fn(spec, cfg, None, shape=shape), opt))
    out = []
    with sharding.use_mesh(mesh):
        for _ in range(2):
            state, m = step(state, batch, frozen)
            out.append({k: float(v) for k, v in jax.device_get(m).items()})
    return out, ds


def check_same_tokens(trl_tokenized, ds):
    for i in range(len(PAIRS)):
        ex, ref = ds.data[i], trl_tokenized[i]
        for side in ("chosen", "rejected"):
            assert ex[f"{side}_input_ids"] == ref["prompt_ids"] + ref[f"{side}_ids"], (i, side)
            assert ex[f"{side}_loss_mask"].index(1) == len(ref["prompt_ids"])


def compare(trl_logs, ours):
    for step, (theirs, mine) in enumerate(zip(trl_logs, ours, strict=True), start=1):
        for k in METRICS:
            np.testing.assert_allclose(mine[k], theirs[k], rtol=1e-4, atol=1e-4, err_msg=f"step {step} {k}")
        np.testing.assert_allclose(mine["grad_norm"], theirs["grad_norm"], rtol=1e-4, err_msg=f"step {step}")
    # the comparison is not vacuous: training moved the margins, and the steps differ
    assert abs(ours[1]["rewards/margins"] - ours[0]["rewards/margins"]) > 1e-3
    assert abs(ours[1]["loss"] - ours[0]["loss"]) > 1e-4


@pytest.mark.parametrize(
    "loss_type,reference", [("sigmoid", "precompute"), ("ipo", "on_the_fly")], ids=["sigmoid", "ipo"]
)
def test_matches_trl_dpo_trainer(setup, tmp_path, loss_type, reference):
    root, model_dir, rows, path = setup
    trl_logs, trl_tokenized = run_trl(
        model_dir, rows, tmp_path / "trl", [loss_type], reference == "precompute"
    )
    ours, ds = run_jaxrlhf(model_dir, path, loss_type, reference)
    check_same_tokens(trl_tokenized, ds)
    compare(trl_logs, ours)


def test_rpo_matches_trl_sigmoid_plus_sft(setup, tmp_path):
    root, model_dir, rows, path = setup
    alpha = 0.5
    trl_logs, _ = run_trl(
        model_dir, rows, tmp_path / "trl", ["sigmoid", "sft"], True, loss_weights=[1.0, alpha]
    )
    ours, _ = run_jaxrlhf(model_dir, path, "sigmoid", "precompute", rpo_alpha=alpha)
    compare(trl_logs, ours)
