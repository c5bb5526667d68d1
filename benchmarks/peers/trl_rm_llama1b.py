"""PyTorch peer of ``benchmarks/rm.py --stage-config benchmarks/configs/rm_llama1b.yaml``: TRL's own
``RewardTrainer`` (trl 1.16) on a random-init ``LlamaForSequenceClassification`` (num_labels = 1) of the
Llama-3.2-1B shape, f32 master weights under bf16 autocast (``bf16=True``), fused AdamW
(``optim="adamw_torch_fused"``), sdpa attention, no gradient checkpointing, ``--pairs`` pairs per step,
``max_length`` 1024.

The data is already tokenized (TRL's ``chosen_ids`` / ``rejected_ids`` columns, so TRL skips its own
tokenization): per pair a random prompt shared by both sides and two random responses, every sequence
``BOS + prompt + response + EOS`` with the same token counts as the jaxrlhf benchmark's pairs
(:func:`pair_lengths`, a copy of ``benchmarks/rm.py``'s: prompts 448-512, responses 400-510 tokens). The
tokenizer is a local word-level one that only names BOS / EOS / PAD / UNK (no network).

Prints one JSON line: seconds per step (mean / median of the steps after ``--warmup``), tokens/s (TRL's own
count, the attention-mask sum of prompt + chosen and prompt + rejected per pair, over the timed steps /
their time), pairs/s, the losses TRL logged, peak memory (``torch.cuda.max_memory_allocated``) and the card.

  python3 benchmarks/peers/trl_rm_llama1b.py [--pairs 8 --max-length 1024 --steps 5 --warmup 1]
  python3 benchmarks/peers/trl_rm_llama1b.py --tiny        # CPU smoke run: tiny shape, 2 steps

Needs trl and datasets (+ dill, multiprocess): ``benchmarks/run_rl_suite.sh`` installs their wheels.
"""

import argparse
import json
import math
import os
import statistics
import tempfile
import time

import numpy as np
import torch
from datasets import Dataset
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers import models as tm
from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast, TrainerCallback

FULL = dict(
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    vocab_size=128256,
    tie_word_embeddings=True,
    max_position_embeddings=4096,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
)
TINY = dict(
    FULL,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=512,
)
BOS, EOS, PAD = 0, 1, 2


def pair_lengths(n: int, max_length: int, seed: int = 0) -> np.ndarray:
    """``[n, 3]`` token counts (prompt, chosen, rejected) without BOS / EOS: benchmarks/rm.py's."""
    h = max_length // 2
    r = np.random.default_rng(seed)
    prompt = r.integers(h - h // 8, h + 1, n)
    resp = r.integers(h * 25 // 32, h - 1, (n, 2))
    return np.concatenate([prompt[:, None], resp], axis=1)


def pair_dataset(n: int, max_length: int, vocab: int) -> Dataset:
    r = np.random.default_rng(1)
    hi = min(32000, vocab)
    cols = {"chosen_ids": [], "rejected_ids": []}
    for p, c, rj in pair_lengths(n, max_length):
        prompt = [BOS, *r.integers(4, hi, int(p)).tolist()]
        cols["chosen_ids"].append(prompt + r.integers(4, hi, int(c)).tolist() + [EOS])
        cols["rejected_ids"].append(prompt + r.integers(4, hi, int(rj)).tolist() + [EOS])
    return Dataset.from_dict(cols)


def local_tokenizer() -> PreTrainedTokenizerFast:
    """Only the special tokens matter: the dataset is already tokenized."""
    tk = Tokenizer(tm.WordLevel({"<s>": BOS, "</s>": EOS, "<pad>": PAD, "<unk>": 3}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step (CUDA synchronised) and TRL's own token count after it."""

    def __init__(self):
        self.t, self.steps, self.tokens, self.trainer = None, [], [], None

    def on_step_begin(self, args, state, control, **kw):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.steps.append(time.perf_counter() - self.t)
        self.tokens.append(getattr(self.trainer, "_total_train_tokens", None))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=None, help="preference pairs per step (8; --tiny 2)")
    p.add_argument("--max-length", type=int, default=None, help="tokens per sequence (1024; --tiny 128)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (5; --tiny 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--optim", default="adamw_torch_fused")
    p.add_argument("--tiny", action="store_true")
    a = p.parse_args()
    a.pairs = a.pairs or (2 if a.tiny else 8)
    a.max_length = a.max_length or (128 if a.tiny else 1024)
    a.steps = a.steps or (2 if a.tiny else 5)
    import transformers
    import trl
    from trl import RewardConfig, RewardTrainer

    cfg = TINY if a.tiny else FULL
    cuda = torch.cuda.is_available()
    d = tempfile.mkdtemp()
    torch.manual_seed(0)
    config = LlamaConfig(
        **cfg, num_labels=1, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, attn_implementation="sdpa"
    )
    with torch.device("cuda" if cuda else "cpu"):  # f32 master weights; built in place on the card
        model = LlamaForSequenceClassification(config)
    total = a.warmup + a.steps
    ds = pair_dataset(a.pairs * total, a.max_length, cfg["vocab_size"])
    args = RewardConfig(
        output_dir=os.path.join(d, "out"),
        bf16=True,
        use_cpu=not cuda,
        per_device_train_batch_size=a.pairs,
        max_length=a.max_length,
        max_steps=total,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        learning_rate=1e-5,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim=a.optim,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = RewardTrainer(model=model, args=args, train_dataset=ds, processing_class=local_tokenizer())
    timer = StepTimer()
    timer.trainer = trainer
    trainer.add_callback(timer)
    trainer.train()
    times = timer.steps[a.warmup :] or timer.steps
    before = timer.tokens[a.warmup - 1] if 0 < a.warmup <= len(timer.tokens) else 0
    tokens = None
    if timer.tokens and timer.tokens[-1] is not None and before is not None:
        tokens = timer.tokens[-1] - before
    if tokens is None:  # no private counter: the dataset's mean (all rows are used once)
        per_pair = sum(len(x) + len(y) for x, y in zip(ds["chosen_ids"], ds["rejected_ids"], strict=True))
        tokens = per_pair / len(ds) * a.pairs * len(times)
    step = sum(times) / len(times)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    m = trainer.model
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
    print(
        json.dumps(
            dict(
                baseline="trl-rm",
                trl=trl.__version__,
                transformers=transformers.__version__,
                torch=torch.__version__,
                shape="tiny" if a.tiny else "llama1b",
                pairs=a.pairs,
                max_length=a.max_length,
                bf16=args.bf16,
                param_dtype=str(next(m.parameters()).dtype),
                optim=getattr(args.optim, "value", str(args.optim)),
                optimizer=f"{type(opt).__name__}(fused={opt.defaults.get('fused')})",
                attention=m.config._attn_implementation,
                gradient_checkpointing=bool(getattr(m, "is_gradient_checkpointing", False)),
                seq_tokens_per_step=tokens / len(times),
                tokens_per_s=tokens / sum(times),
                pairs_per_s=a.pairs / step,
                step_s=step,
                step_s_median=statistics.median(times),
                steps=[round(s, 4) for s in timer.steps],
                warmup_steps=a.warmup,
                losses=losses[a.warmup :],
                finite=all(math.isfinite(x) for x in losses),
                peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
                card=torch.cuda.get_device_name(0) if cuda else "cpu",
            )
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
