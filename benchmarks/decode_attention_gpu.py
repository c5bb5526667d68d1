"""GPU check of the fused decode-attention kernel (issue 16): parity with the plain path, then its time.

    PYTHONPATH=. python3 benchmarks/decode_attention_gpu.py          # GPU (bf16, Pallas / Triton)
    PYTHONPATH=. python3 benchmarks/decode_attention_gpu.py --tiny   # CPU smoke run (Pallas interpreter)

Parity (one JSON line per case): ``_decode_attention.decode_attention`` against ``attend(impl="plain")`` on
bf16 inputs, both against an f32 plain reference on the same (bf16-rounded) inputs; masks: left-padded rows
(the generation cache's layout), random holes, one fully masked row. Then greedy generation with a tiny
random Llama, ``attention_impl="fused"`` (prefill by cuDNN, decode by the kernel) against ``"plain"``: the
share of equal tokens and the largest raw log-prob difference over the tokens both runs agree on.
Timing: one decode step's attention at the 1.24B Llama's shape (32 q heads / 8 kv, head dim 64), batch 64,
S cache slots, in a 64-step ``fori_loop``; bytes = the K and V read.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf import generation, models
from jaxrlhf.models import _decode_attention, attention
from jaxrlhf.models.spec import ModelSpec


def _inputs(b, s, h, kv, d, seed):
    r = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(r.standard_normal(shape), jnp.bfloat16) for shape in
               ((b, 1, h, d), (b, s, kv, d), (b, s, kv, d)))  # fmt: skip
    start = r.integers(0, s // 2, b)  # left padding: slots before start are empty
    mask = np.arange(s)[None, :] >= start[:, None]
    mask[0] &= r.random(s) < 0.7  # holes
    mask[-1] = False  # a fully masked row
    return q, k, v, jnp.asarray(mask[:, None, None, :])


def parity(args) -> list[dict]:
    out = []
    cases = [(3, 64, 8, 2, 64)]
    if not args.tiny:
        cases = [(64, 384, 32, 8, 64), (8, 2048, 32, 8, 128), (4, 256, 16, 16, 64)]
    for b, s, h, kv, d in cases:
        q, k, v, mask = _inputs(b, s, h, kv, d, b + s)
        scale = d**-0.5
        ref = attention.attend(*(x.astype(jnp.float32) for x in (q, k, v)), mask, scale=scale, impl="plain")
        plain = attention.attend(q, k, v, mask, scale=scale, impl="plain")
        kern = _decode_attention.decode_attention(q, k, v, mask, scale=scale, interpret=args.tiny)
        diff = lambda a, c: float(jnp.max(jnp.abs(a.astype(jnp.float32) - c.astype(jnp.float32))))
        row = dict(bench="decode-attention-parity", shape=[b, s, h, kv, d], kernel_vs_f32=diff(kern, ref))
        row.update(plain_bf16_vs_f32=diff(plain, ref), kernel_vs_plain=diff(kern, plain))
        out.append(dict(row, finite=bool(jnp.isfinite(kern).all())))
    spec = ModelSpec(
        model_type="llama", vocab_size=512, hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
        head_dim=64, intermediate_size=512, max_position_embeddings=1024, rope_theta=10000.0, norm_eps=1e-5,
    )  # fmt: skip
    params = models.init_params(spec, jax.random.key(0))
    ids = jax.random.randint(jax.random.key(1), (8, 48), 3, 512, jnp.int32)
    pmask = jnp.arange(48)[None, :] >= jnp.arange(8)[:, None] * 5  # left padding 0..35
    new = 16 if args.tiny else 80
    cfg = generation.SamplingConfig(max_new_tokens=new, temperature=0.0, stop_token_ids=())
    res = {}
    for impl in ("plain", "fused"):
        g = generation.generate(spec, params, ids, pmask.astype(jnp.int32), jax.random.key(2), cfg,
                                compute_dtype=jnp.bfloat16, attention_impl=impl)  # fmt: skip
        res[impl] = (np.asarray(g.tokens), np.asarray(g.raw_logprobs))
    same = res["plain"][0] == res["fused"][0]
    agree = np.cumprod(same, axis=1).astype(bool)  # positions before the first disagreement of a row
    lp_diff = float(np.abs(res["plain"][1] - res["fused"][1])[agree].max())
    out.append(dict(bench="decode-attention-generate", equal_tokens=float(same.mean()),
                    prefix_agreement=float(agree.mean()), max_raw_logprob_diff=lp_diff))  # fmt: skip
    return out


def _looped(fn):
    """``fn(q, k, v, mask)`` 64 times in a ``fori_loop`` (each call depending on the last), jitted."""

    @jax.jit
    def run(q, k, v, mask):
        def body(i, acc):
            return acc + fn(q + acc.astype(q.dtype) * 0, k, v, mask).astype(jnp.float32)

        return jax.lax.fori_loop(0, 64, body, jnp.zeros(q.shape, jnp.float32))

    return run


def timing(args) -> list[dict]:
    out = []
    b, h, kv, d = (4, 8, 2, 64) if args.tiny else (64, 32, 8, 64)
    for s in (64,) if args.tiny else (192, 384, 2048):
        q, k, v, mask = _inputs(b, s, h, kv, d, s)
        scale = d**-0.5

        plain = _looped(lambda q, k, v, m, sc=scale: attention.attend(q, k, v, m, scale=sc, impl="plain"))
        kern = _looped(lambda q, k, v, m, sc=scale: _decode_attention.decode_attention(
            q, k, v, m, scale=sc, interpret=args.tiny))  # fmt: skip
        row = dict(bench="decode-attention-time", batch=b, slots=s, heads=[h, kv, d])
        for name, fn in (("plain", plain), ("kernel", kern)):
            jax.block_until_ready(fn(q, k, v, mask))
            best = float("inf")
            for _ in range(5):
                t = time.perf_counter()
                jax.block_until_ready(fn(q, k, v, mask))
                best = min(best, time.perf_counter() - t)
            per = best / 64
            row[f"{name}_us"] = per * 1e6
            row[f"{name}_gb_per_s"] = 2 * k.size * k.dtype.itemsize / per / 1e9
        row["card"] = jax.devices()[0].device_kind
        out.append(row)
    return out


def sweep(args) -> list[dict]:
    """The kernel alone per (largest block, num_warps, num_stages) at the generation benchmark's cache sizes
    (prompt 128 + 64 .. 256 new slots, batch 64); the last row names the fastest setting over all sizes."""
    b, h, kv, d = (4, 8, 2, 64) if args.tiny else (64, 32, 8, 64)
    sizes = (64,) if args.tiny else (192, 256, 320, 384)
    settings = [(bl, w, st) for bl in (32, 64, 128) for w in (2, 4, 8) for st in (1, 2, 3)]
    if args.tiny:
        settings = settings[:2]
    data = {s: _inputs(b, s, h, kv, d, s) for s in sizes}
    out, totals = [], {}
    for setting in settings:
        row = dict(bench="decode-attention-sweep", setting=list(setting))
        try:
            for s in sizes:
                q, k, v, mask = data[s]
                fn = _looped(lambda q, k, v, m, sc=d**-0.5, st=setting: _decode_attention.decode_attention(
                    q, k, v, m, scale=sc, interpret=args.tiny, setting=st))  # fmt: skip
                jax.block_until_ready(fn(q, k, v, mask))
                best = min(_timed(fn, q, k, v, mask) for _ in range(3))
                row[f"us_{s}"] = best / 64 * 1e6
            totals[setting] = sum(row[f"us_{s}"] for s in sizes)
        except Exception as e:  # a setting Triton refuses (e.g. out of shared memory)
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        out.append(row)
    if totals:
        best = min(totals, key=totals.get)
        default = totals.get(_decode_attention.DEFAULT_TUNING)
        out.append(dict(bench="decode-attention-sweep-best", setting=",".join(map(str, best)),
                        total_us=totals[best], default_total_us=default))  # fmt: skip
    return out


def _timed(fn, *a) -> float:
    t = time.perf_counter()
    jax.block_until_ready(fn(*a))
    return time.perf_counter() - t


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU smoke run (Pallas interpreter)")
    p.add_argument("--sweep", action="store_true", help="time the kernel's block / warps / stages settings")
    args = p.parse_args(argv)
    rows = sweep(args) if args.sweep else parity(args) + timing(args)
    for row in rows:
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
