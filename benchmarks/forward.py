"""Forward-pass throughput of a Llama-3.2-1B-shaped decoder, plain vs fused attention.

    python benchmarks/forward.py            # GPU: bf16, batch 8 x 2048
    python benchmarks/forward.py --tiny     # CPU smoke test

Prints one JSON line per attention implementation with tokens/s and MFU, where
``flops/token = 2 * N_matmul + 4 * L * T * H * D`` (weight matmuls incl. the LM head, plus QK^T and PV over
the full T x T score matrix, which is what both paths compute) and MFU = flops/token * tokens/s / peak
(989e12 bf16 dense FLOP/s, the H100/H200 SXM figure).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp

from jaxrlhf import models
from jaxrlhf.models.spec import ModelSpec

PEAK_FLOPS = 989e12

LLAMA_3_2_1B = ModelSpec(
    model_type="llama",
    vocab_size=128256,
    hidden_size=2048,
    num_layers=16,
    num_heads=32,
    num_kv_heads=8,
    head_dim=64,
    intermediate_size=8192,
    max_position_embeddings=131072,
    norm_eps=1e-5,
    rope_theta=500000.0,
    tie_word_embeddings=True,
)
TINY = LLAMA_3_2_1B.replace(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                            head_dim=16, intermediate_size=128)  # fmt: skip


def flops_per_token(spec: ModelSpec, seq: int) -> float:
    n = models.count_params(spec)
    if not spec.tie_word_embeddings:
        n -= spec.vocab_size * spec.hidden_size  # the input embedding is a lookup, not a matmul
    return 2.0 * n + 4.0 * spec.num_layers * seq * spec.num_heads * spec.head_dim


def bench(spec: ModelSpec, batch: int, seq: int, impl: str, dtype, steps: int, warmup: int) -> dict:
    params = models.init_params(spec, jax.random.key(0), dtype)
    ids = jax.random.randint(jax.random.key(1), (batch, seq), 0, spec.vocab_size)

    @jax.jit
    def fwd(p, x):
        return models.forward(spec, p, x, compute_dtype=dtype, attention_impl=impl).logits

    t0 = time.perf_counter()
    fwd(params, ids).block_until_ready()
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        fwd(params, ids).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(steps):
        out = fwd(params, ids)
    out.block_until_ready()
    step_s = (time.perf_counter() - t0) / steps
    tps = batch * seq / step_s
    return {
        "benchmark": "forward",
        "model": "llama-3.2-1b-shape" if spec.vocab_size == LLAMA_3_2_1B.vocab_size else "tiny",
        "attention_impl": impl,
        "batch": batch,
        "seq": seq,
        "dtype": jnp.dtype(dtype).name,
        "params": models.count_params(spec),
        "step_time_s": round(step_s, 5),
        "compile_s": round(compile_s, 2),
        "tokens_per_s": round(tps, 1),
        "mfu": round(flops_per_token(spec, seq) * tps / PEAK_FLOPS, 4),
        "card": jax.devices()[0].device_kind,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny model, batch 2 x 64 (CPU smoke test)")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--impl", default="plain,fused", help="comma-separated: plain, fused")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    spec = TINY if args.tiny else LLAMA_3_2_1B
    batch = args.batch or (2 if args.tiny else 8)
    seq = args.seq or (64 if args.tiny else 2048)
    steps = args.steps or (3 if args.tiny else 10)
    for impl in args.impl.split(","):
        print(json.dumps(bench(spec, batch, seq, impl, jnp.bfloat16, steps, args.warmup)), flush=True)


if __name__ == "__main__":
    main()
