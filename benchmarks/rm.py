"""Reward-model training throughput of jaxrlhf on a Llama-3.2-1B-shaped model (random weights and tokens).

One train step = one forward pass over the 2B concatenated chosen + rejected rows, the Bradley-Terry loss,
backward, AdamW. One JSON line per mode: tokens/s (both halves counted), pairs/s, step time,
MFU = (6N + 6 L T E) * tokens/s / peak (the card's dense bf16 peak from ``train.peak_flops``; 989e12 when
unknown, like the SFT benchmark), peak device memory and the card. The unused LM-head logits are removed by
XLA (the head reads the final hidden states only), so N excludes nothing and the MFU is conservative.

    PYTHONPATH=. python benchmarks/rm.py             # GPU: 8 pairs x 1024, bf16 compute, full + LoRA
    PYTHONPATH=. python benchmarks/rm.py --tiny      # CPU smoke run
    options: --mode full|lora|both  --pairs 8  --seq 1024  --remat none|full|save_dots
             --attention fused|plain  --param-dtype float32|bfloat16  --lora-rank 16  --steps 5
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp

from jaxrlhf import lora, losses, models, reward_model, sharding, train
from jaxrlhf.models import heads

LLAMA_1B = models.ModelSpec(
    model_type="llama",
    vocab_size=128256,
    hidden_size=2048,
    num_layers=16,
    num_heads=32,
    num_kv_heads=8,
    head_dim=64,
    intermediate_size=8192,
    max_position_embeddings=4096,
    rope_theta=500000.0,
    norm_eps=1e-5,
    tie_word_embeddings=True,
    pad_token_id=0,
)
TINY = LLAMA_1B.replace(
    vocab_size=256,
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    intermediate_size=128,
)
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_loss(spec, args, lora_config=None):
    def loss_fn(trainable, frozen, batch, rng):
        base = trainable["params"] if lora_config is None else frozen
        r_c, r_r = reward_model.score_pairs(
            spec,
            base,
            trainable["head"],
            batch,
            lora=trainable.get("lora"),
            lora_config=lora_config,
            compute_dtype=jnp.bfloat16,
            attention_impl=args.attention,
            remat=args.remat,
        )
        loss, m = losses.reward_loss(r_c, r_r, margin=batch["margin"])
        return loss, {"accuracy": m["accuracy"]}

    return loss_fn


def make_batch(spec, pairs: int, seq: int) -> dict:
    keys = jax.random.split(jax.random.PRNGKey(2), 2)
    batch = {"margin": jnp.zeros((pairs,), jnp.float32)}
    for side, key in zip(("chosen", "rejected"), keys, strict=True):
        batch[f"{side}_input_ids"] = jax.random.randint(key, (pairs, seq), 1, spec.vocab_size, jnp.int32)
        batch[f"{side}_attention_mask"] = jnp.ones((pairs, seq), jnp.int32)
    return batch


def run(mode: str, args) -> dict:
    spec = TINY if args.tiny else LLAMA_1B
    mesh = sharding.make_mesh(data=1, fsdp=-1, tensor=1)
    axes = models.param_axes(spec)
    opt = train.make_optimizer(
        train.OptimConfig(lr=1e-5, schedule="constant", weight_decay=0.0, clip_norm=1.0)
    )
    rng = jax.random.PRNGKey(0)
    head = heads.init_head(spec, jax.random.PRNGKey(3))
    if mode == "full":
        params = models.init_params(spec, rng, dtype=jnp.dtype(args.param_dtype), mesh=mesh)
        trainable, frozen, t_axes = {"params": params, "head": head}, None, {"params": axes}
        cfg = None
    else:
        cfg = lora.LoraConfig(rank=args.lora_rank, alpha=args.lora_rank, targets=ALL_LINEAR)
        frozen = models.init_params(spec, rng, dtype=jnp.bfloat16, mesh=mesh)  # frozen shared base in bf16
        adapters = lora.init(spec, frozen, cfg, jax.random.PRNGKey(1))
        trainable = {"lora": adapters, "head": head}
        t_axes = {"lora": lora.param_axes(axes, adapters)}
    t_axes["head"] = heads.head_axes()
    state, shard = train.init_train_state(trainable, opt, 0, mesh=mesh, params_axes=t_axes)
    step = train.make_train_step(
        make_loss(spec, args, cfg), opt, param_compute_dtype=jnp.bfloat16 if mode == "full" else None
    )
    step = train.jit_train_step(step, shard, mesh=mesh)
    batch = make_batch(spec, args.pairs, args.seq)
    t_compile = time.perf_counter()
    for _ in range(2):  # compile + warm-up
        state, metrics = step(state, batch, frozen)
    float(metrics["loss"])
    t_compile = time.perf_counter() - t_compile
    t = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = step(state, batch, frozen)
    loss = float(metrics["loss"])
    dt = (time.perf_counter() - t) / args.steps
    tokens = 2 * args.pairs * args.seq / dt
    n_params = models.count_params(spec)
    fpt = train.flops_per_token(n_params, spec.num_layers, args.seq, spec.hidden_size)
    card = jax.devices()[0].device_kind
    peak = train.peak_flops(card) or 989e12
    stats = jax.devices()[0].memory_stats() or {}
    return dict(
        bench="jaxrlhf-rm",
        mode=mode,
        lora=args.lora_rank if mode == "lora" else 0,
        pairs=args.pairs,
        seq=args.seq,
        remat=args.remat,
        attention=args.attention,
        param_dtype=args.param_dtype,
        n_params=n_params,
        tokens_per_s=tokens,
        pairs_per_s=args.pairs / dt,
        step_ms=dt * 1e3,
        model_tflops=fpt * tokens / 1e12,
        mfu=fpt * tokens / peak,
        peak_flops=peak,
        peak_gib=stats.get("peak_bytes_in_use", 0) / 2**30,
        loss=loss,
        compile_s=t_compile,
        devices=len(jax.devices()),
        card=card,
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["full", "lora", "both"], default="both")
    p.add_argument("--tiny", action="store_true", help="tiny model, 2 pairs x 32: a CPU smoke run")
    p.add_argument("--pairs", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--remat", choices=["none", "full", "save_dots"], default="none")
    p.add_argument("--attention", choices=["fused", "plain"], default="fused")
    p.add_argument("--param-dtype", choices=["float32", "bfloat16"], default="float32")
    args = p.parse_args(argv)
    args.pairs = args.pairs or (2 if args.tiny else 8)
    args.seq = args.seq or (32 if args.tiny else 1024)
    for mode in ["full", "lora"] if args.mode == "both" else [args.mode]:
        print(json.dumps(run(mode, args)), flush=True)


if __name__ == "__main__":
    main()
