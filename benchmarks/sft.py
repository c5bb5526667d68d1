"""SFT training throughput of jaxrlhf on a Llama-3.2-1B-shaped model (random weights, random tokens).

Compare with ``/work/shared/baselines/hf_llama1b.py train`` run in the same call. One JSON line per
measurement: tokens/s, step time, MFU = (6N + 6 L T E) * tokens/s / 989e12 (same formula as the baseline),
peak device memory and the card.

    PYTHONPATH=. python benchmarks/sft.py --mode both                 # H100/H200: 8 x 2048, bf16 compute
    PYTHONPATH=. python benchmarks/sft.py --mode both --tiny          # CPU smoke run
    PYTHONPATH=. python benchmarks/sft.py --stage-config benchmarks/configs/sft_llama1b.yaml [--set k=v ...]
        # the SFT stage's own step (its loader's packed batch, make_loss_fn, train step); see _stage.py
    options: --remat none|full|save_dots  --attention fused|plain  --param-dtype float32|bfloat16
             --grad-accum K (K micro-batches of --batch rows per step)  --lora-rank 16  --steps 5
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import optax

from jaxrlhf import lora, models, sharding, train

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
    """Next-token cross-entropy over all positions (no padding: the fused kernel's causal path applies)."""

    def loss_fn(params, frozen, batch, rng):
        base, adapters = (params, None) if lora_config is None else (frozen, params)
        logits = models.forward(
            spec,
            base,
            batch,
            None,
            lora=adapters,
            lora_config=lora_config,
            compute_dtype=jnp.bfloat16,
            attention_impl=args.attention,
            remat=args.remat,
        ).logits
        # shifted labels instead of slicing logits[:, :-1]: no copy of the [B, T, V] f32 logits
        labels = jnp.roll(batch, -1, axis=-1)
        weight = jnp.ones(batch.shape, jnp.float32).at[:, -1].set(0.0)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return (nll * weight).sum() / weight.sum(), {}

    return loss_fn


def build(mode: str, args):
    """``(jitted step, train state, token batch)`` of one benchmark configuration."""
    spec = TINY if args.tiny else LLAMA_1B
    mesh = sharding.make_mesh(data=1, fsdp=-1, tensor=1)
    axes = models.param_axes(spec)
    p_dtype = jnp.dtype(args.param_dtype)
    opt = train.make_optimizer(
        train.OptimConfig(lr=1e-5, schedule="constant", weight_decay=0.0, clip_norm=1.0)
    )
    rng = jax.random.PRNGKey(0)
    if mode == "full":
        params = models.init_params(spec, rng, dtype=p_dtype, mesh=mesh)
        state, shard = train.init_train_state(params, opt, 0, mesh=mesh, params_axes=axes)
        loss_fn, frozen = make_loss(spec, args), None
    else:
        cfg = lora.LoraConfig(rank=args.lora_rank, alpha=args.lora_rank, targets=ALL_LINEAR)
        base = models.init_params(spec, rng, dtype=jnp.bfloat16, mesh=mesh)  # frozen base in bf16, like peft
        adapters = lora.init(spec, base, cfg, jax.random.PRNGKey(1))
        state, shard = train.init_train_state(
            adapters, opt, 0, mesh=mesh, params_axes=lora.param_axes(axes, adapters)
        )
        loss_fn, frozen = make_loss(spec, args, cfg), base
    step = train.make_train_step(
        loss_fn, opt, grad_accum=args.grad_accum, param_compute_dtype=jnp.bfloat16 if mode == "full" else None
    )
    step = train.jit_train_step(step, shard, mesh=mesh, grad_accum=args.grad_accum)
    shape = (args.batch, args.seq) if args.grad_accum == 1 else (args.grad_accum, args.batch, args.seq)
    ids = jax.random.randint(jax.random.PRNGKey(2), shape, 0, spec.vocab_size, jnp.int32)
    return step, state, ids, frozen


def run(mode: str, args) -> dict:
    spec = TINY if args.tiny else LLAMA_1B
    step, state, ids, frozen = build(mode, args)
    t_compile = time.perf_counter()
    for _ in range(2):  # compile + warm-up
        state, metrics = step(state, ids, frozen)
    float(metrics["loss"])
    t_compile = time.perf_counter() - t_compile
    t = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = step(state, ids, frozen)
    loss = float(metrics["loss"])
    dt = (time.perf_counter() - t) / args.steps
    tokens = args.batch * args.seq * args.grad_accum / dt
    n_params = models.count_params(spec)
    fpt = train.flops_per_token(n_params, spec.num_layers, args.seq, spec.hidden_size)
    stats = jax.devices()[0].memory_stats() or {}
    return dict(
        bench="jaxrlhf-sft",
        mode=mode,
        lora=args.lora_rank if mode == "lora" else 0,
        batch=args.batch,
        seq=args.seq,
        grad_accum=args.grad_accum,
        remat=args.remat,
        attention=args.attention,
        param_dtype=args.param_dtype,
        n_params=n_params,
        tokens_per_s=tokens,
        step_ms=dt * 1e3,
        model_tflops=fpt * tokens / 1e12,
        mfu_vs_989=fpt * tokens / 989e12,
        peak_gib=stats.get("peak_bytes_in_use", 0) / 2**30,
        loss=loss,
        compile_s=t_compile,
        devices=len(jax.devices()),
        card=jax.devices()[0].device_kind,
    )


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["full", "lora", "both"], default="both")
    p.add_argument("--tiny", action="store_true", help="tiny model, batch 2 x 32: a CPU smoke run")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--remat", choices=["none", "full", "save_dots"], default="none")
    p.add_argument("--attention", choices=["fused", "plain"], default="fused")
    p.add_argument("--param-dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--stage-config", default=None, help="time the SFT stage's own step from this config")
    p.add_argument("--set", action="append", default=[], help="config override key=value (--stage-config)")
    args = p.parse_args()
    if args.stage_config:
        import _stage

        print(json.dumps(_stage.stage_step(args.stage_config, args.set, args.steps)), flush=True)
        return
    args.batch = args.batch or (2 if args.tiny else 8)
    args.seq = args.seq or (32 if args.tiny else 2048)
    for mode in ["full", "lora"] if args.mode == "both" else [args.mode]:
        print(json.dumps(run(mode, args)), flush=True)


if __name__ == "__main__":
    main()
