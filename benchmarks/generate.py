"""Generation throughput of ``jaxrlhf.generation.generate`` on a Llama-3.2-1B-shaped model (random weights).

Prints one JSON line per measurement: the card's copy bandwidth (a large device-to-device copy, bytes read +
written / time), then per batch size tokens/s, the decode step time and the memory bandwidth a decode step
achieves: ``(weight bytes + KV-cache bytes read) / step time``, as a fraction of the measured copy bandwidth.

  PYTHONPATH=. python3 benchmarks/generate.py                      # GPU: 1.24B bf16, batch 1 64 256
  PYTHONPATH=. python3 benchmarks/generate.py --with-hf            # also runs the transformers baseline
  PYTHONPATH=. python3 benchmarks/generate.py --tiny               # CPU smoke test
  PYTHONPATH=. python3 benchmarks/generate.py --batch 64 --sampling greedy t1 topp0.9 topk50
      # sampling cost: greedy, temperature 1, top-p 0.9 / top-k 50 at temperature 1 (same executable shape)

The transformers baseline (static cache + torch.compile) is /work/shared/baselines/hf_llama1b.py; run it in
the same call (``--with-hf``) since machines differ.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf import generation, models
from jaxrlhf.models.spec import ModelSpec

LLAMA_1B = dict(
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
    tie_word_embeddings=True,
    norm_eps=1e-5,
)
TINY = dict(LLAMA_1B, vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
            intermediate_size=128)  # fmt: skip

HF_SCRIPTS = (
    "shared/baselines/hf_llama1b.py",
    "../shared/baselines/hf_llama1b.py",
    "/work/shared/baselines/hf_llama1b.py",
)


def card() -> str:
    return jax.devices()[0].device_kind


def _best_time(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # warm-up (compiles)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t)
    return best


def copy_bandwidth(n_bytes: int, repeats: int) -> float:
    """Bytes read + written per second by a large on-device elementwise copy: the best of at least 20
    copies after 20 untimed ones. The untimed copies bring the clocks up from idle: the first reading of
    a process came out anywhere between 2.26 and 2.85 TB/s on one H100 on 2026-12-06 with 2 copies, which
    moved the decode step's "fraction of copy bandwidth" by 18 points with the step itself unchanged."""
    x = jnp.ones((n_bytes // 2,), jnp.bfloat16)
    copy = jax.jit(lambda a: a + jnp.bfloat16(1))
    for _ in range(20):
        y = copy(x)
    jax.block_until_ready(y)
    t = _best_time(lambda: copy(x), max(repeats, 20))
    return 2 * x.size * 2 / t


SAMPLING = {"greedy": dict(temperature=0.0), "t1": dict(temperature=1.0)}


def sampling_kwargs(mode: str) -> dict:
    """``greedy``, ``t1`` (temperature 1), ``toppP`` (top-p P at temperature 1), ``topkK`` (top-k K)."""
    if mode in SAMPLING:
        return SAMPLING[mode]
    if mode.startswith("topp"):
        return dict(temperature=1.0, top_p=float(mode[4:]))
    if mode.startswith("topk"):
        return dict(temperature=1.0, top_k=int(mode[4:]))
    raise ValueError(f"unknown sampling mode {mode!r}: greedy, t1, topp<P>, topk<K>")


def bench_batch(
    spec: ModelSpec, params, batch: int, prompt: int, new: int, args, bw: float, sampling: str = "greedy"
) -> dict:
    """Time one batch size: whole generate call, and prefill + first step, to isolate the decode step."""
    dtype = jnp.bfloat16
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    ids = jax.random.randint(jax.random.key(1), (batch, prompt), 0, min(32000, spec.vocab_size), jnp.int32)
    mask = jnp.ones_like(ids)
    # every row runs the full length, like the baseline's min_new_tokens=max_new_tokens
    cfg = generation.SamplingConfig(
        max_new_tokens=new, min_new_tokens=new, stop_token_ids=(), **sampling_kwargs(sampling)
    )
    m, rcfg, pids, pmask, rows = generation._setup(
        spec, ids, mask, cfg, None, None, dtype, dtype, args.attention, None, bool(args.fuse),
        args.kv_segments,
    )  # fmt: skip

    def run(steps):
        return generation._generate_jit(
            m, rcfg, params, pids, pmask, jax.random.key(2), jnp.int32(steps), None
        )

    out = run(new)
    assert int(out.lengths[:rows].min()) == new, "every row must run the full length"
    total = _best_time(lambda: run(new), args.repeats)
    first = _best_time(lambda: run(1), args.repeats)  # prefill + one decode step, same executable
    step = (total - first) / (new - 1)
    # the cache slots a step attends over, averaged over the steps (decode phases: generation._segment_ends)
    ends = generation._segment_ends(rcfg.max_new_tokens, m.kv_segments)
    starts = (0,) + ends[:-1]
    slots = (
        sum((min(e, new) - min(b, new)) * (pids.shape[1] + e) for b, e in zip(starts, ends, strict=True))
        / new
    )
    kv_bytes = (
        spec.num_layers * 2 * batch * slots * spec.num_kv_heads * spec.head_dim * jnp.dtype(dtype).itemsize
    )
    achieved = (weight_bytes + kv_bytes) / step
    return dict(
        bench="jaxrlhf-generate",
        sampling=sampling,
        batch=batch,
        prompt=prompt,
        new=new,
        params=sum(x.size for x in jax.tree.leaves(params)),
        tokens_per_s=batch * new / total,
        total_s=total,
        prefill_plus_first_step_ms=first * 1e3,
        decode_step_ms=step * 1e3,
        decode_tokens_per_s=batch / step,
        weight_gb=weight_bytes / 1e9,
        kv_cache_gb_read_per_step=kv_bytes / 1e9,
        achieved_gb_per_s=achieved / 1e9,
        fraction_of_copy_bandwidth=achieved / bw,
        attention=args.attention,
        fuse_projections=bool(args.fuse),
        kv_segments=m.kv_segments,
        kv_slots_per_step=slots,
        decode_rows=int(pids.shape[0]),  # > batch: a single row decoded as two (generation._MIN_DECODE_ROWS)
        xla_flags=os.environ.get("XLA_FLAGS", ""),
        card=card(),
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny model on CPU (smoke test)")
    p.add_argument("--batch", type=int, nargs="+", default=None)
    p.add_argument("--prompt", type=int, default=None)
    p.add_argument("--new", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--attention", default="plain", choices=["plain", "fused"])
    p.add_argument(
        "--fuse", type=int, default=1, help="fuse q/k/v and gate/up kernels (1, default) or not (0)"
    )
    p.add_argument(
        "--pad-single-row",
        type=int,
        default=1,
        help="decode batch 1 as two rows on GPU (1, default) or not (0)",
    )
    p.add_argument("--kv-segments", type=int, default=None, help="decode phases (default: the library's)")
    p.add_argument("--with-hf", action="store_true", help="also run the transformers baseline script")
    p.add_argument("--sampling", nargs="+", default=["greedy"], help="greedy t1 topp0.9 topk50 ...")
    p.add_argument(
        "--hf-script", default=None, help="default: shared/baselines/hf_llama1b.py here or in /work"
    )
    args = p.parse_args(argv)
    if not args.pad_single_row:
        generation._MIN_DECODE_ROWS.clear()
    batches = args.batch or ([1, 4] if args.tiny else [1, 64, 256])
    prompt = args.prompt or (16 if args.tiny else 128)
    new = args.new or (16 if args.tiny else 256)

    if args.with_hf:  # first, before JAX claims most of the GPU's memory
        candidates = [args.hf_script] if args.hf_script else list(HF_SCRIPTS)
        script = next((c for c in candidates if os.path.exists(c)), None)
        if script is None:
            raise FileNotFoundError(
                f"transformers baseline script not found (tried {candidates}); pass --hf-script"
            )
        cmd = [sys.executable, script, "generate", "--batch", *map(str, batches)]
        cmd += ["--prompt", str(prompt), "--new", str(new)]
        subprocess.run(cmd, check=True)
    bw = copy_bandwidth((64 << 20) if args.tiny else (4 << 30), args.repeats)
    print(json.dumps(dict(bench="copy_bandwidth", gb_per_s=bw / 1e9, card=card())), flush=True)

    spec = ModelSpec(**(TINY if args.tiny else LLAMA_1B))
    params = models.init_params(spec, jax.random.key(0), dtype=jnp.bfloat16)
    for batch in batches:
        for mode in args.sampling:
            print(json.dumps(bench_batch(spec, params, batch, prompt, new, args, bw, mode)), flush=True)


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
