"""Micro-benchmark of the sampler alone at a decode step's shape: every search method of jaxrlhf._sampling.

    python3 benchmarks/sampling_micro.py [--batch 64] [--vocab 128256] [--iters 256] [--only topp,topk]

On [B, V] f32 logits, two cases: "flat" (N(0, 1) * 0.5: what a random-weight model gives; the top-p 0.9
nucleus holds most of the vocabulary) and "peaked" (N(0, 3^2): a nucleus of a few hundred tokens). For
greedy, temperature 1 and, per :data:`jaxrlhf._sampling.METHODS` entry (plus a 3-bit radix), top-p
0.9 and top-k 50, it times the whole ``sample`` (token, log-prob, raw log-prob) jitted:

  ms_call: the median of single calls (one step per call, block_until_ready; includes dispatch);
  ms_iter: one call running ``--iters`` steps in a ``lax.fori_loop`` (logits shifted by a step-dependent
           scalar so nothing is hoisted), median over calls, divided by the steps: the decode loop's cost.

and checks on the device that each method's kept set equals the reference method's ("radix") on the same
logits, that every drawn token lies in it, and that the reported log-prob is its log-softmax. One JSON line
per (config, method, case); the last lines are a table of ms_iter minus greedy's.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxrlhf._sampling import METHODS, SamplingConfig, SearchMethod, candidates, sample  # noqa: E402

CONFIGS = {
    "greedy": SamplingConfig(max_new_tokens=1, temperature=0.0),
    "temp1": SamplingConfig(max_new_tokens=1, temperature=1.0),
    "topp": SamplingConfig(max_new_tokens=1, temperature=1.0, top_p=0.9),
    "topk": SamplingConfig(max_new_tokens=1, temperature=1.0, top_k=50),
}
EXTRA = {  # a 3-bit radix for top-p (2- and 3-bit passes lost to 4-bit on the H200, 2026-12-03)
    "radix3_cdf": SearchMethod(radix_bits=3, draw="cdf"),
}


def looped(cfg: SamplingConfig, method):
    """``n`` decode-like steps (n traced: one executable for n = 1 and n = iters)."""

    def run(z, rng, n):
        def body(i, acc):
            zi = z + jnp.float32(1e-6) * i.astype(jnp.float32)
            tok, lp, raw = sample(zi, jax.random.fold_in(rng, i), cfg, method=method)
            return acc + tok.sum().astype(jnp.float32) + lp.sum() + raw.sum()

        return jax.lax.fori_loop(0, n, body, jnp.float32(0))

    return jax.jit(run)


def timed(f, *args, reps: int) -> float:
    f(*args).block_until_ready()  # compile + warm
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        f(*args).block_until_ready()
        out.append(time.perf_counter() - t)
    return statistics.median(out) * 1e3


@functools.cache
def _checked(cfg: SamplingConfig, method):
    ref = jax.jit(lambda x: jnp.isfinite(candidates(x, cfg, method="radix")[0]))
    cand = jax.jit(lambda x: candidates(x, cfg, method=method)[0])
    draw = jax.jit(lambda x, r: sample(x, r, cfg, method=method))
    return ref, cand, draw


def check(cfg, method, z, rng) -> dict:
    """Kept set == the reference's; drawn tokens inside it; log-prob == log-softmax of the candidates."""
    ref, cand, draw = _checked(cfg, method)
    ref, cand = ref(z), cand(z)
    tok, lp, _ = draw(z, rng)
    kept = jnp.isfinite(cand)
    in_set = jnp.take_along_axis(kept, tok[:, None], 1)[:, 0]
    want = jnp.take_along_axis(jax.nn.log_softmax(cand, axis=-1), tok[:, None], 1)[:, 0]
    return dict(
        kept_equal=bool((kept == ref).all()),
        rows_differing=int((kept != ref).any(axis=1).sum()),
        # top-p sums added in another order may move a boundary by float rounding: the mass that moved
        diff_mass=float((jax.nn.softmax(z, axis=-1) * (kept != ref)).sum(axis=1).max()),
        drawn_in_set=bool(in_set.all()),
        logprob_err=float(jnp.abs(lp - want).max()),
        kept_mean=float(kept.sum(axis=1).mean()),
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--iters", type=int, default=256)
    ap.add_argument("--reps", type=int, default=30, help="single calls per timing")
    ap.add_argument("--loop-reps", type=int, default=5, help="looped calls per timing")
    ap.add_argument("--only", default="", help="comma list of configs (greedy,temp1,topp,topk)")
    ap.add_argument("--methods", default="", help="comma list of method names (default: all)")
    args = ap.parse_args()
    print(json.dumps(dict(devices=[str(d) for d in jax.devices()], jax=jax.__version__)), flush=True)

    rs = np.random.RandomState(0)
    base = rs.randn(args.batch, args.vocab).astype(np.float32)
    cases = {"flat": jnp.asarray(base * 0.5), "peaked": jnp.asarray(base * 3.0)}
    rng = jax.random.key(0)
    methods = {**METHODS, **EXTRA}
    if args.methods:
        methods = {k: methods[k] for k in args.methods.split(",")}
    wanted = args.only.split(",") if args.only else list(CONFIGS)
    runs = [(c, "-", None) for c in ("greedy", "temp1") if c in wanted]
    runs += [(c, m, methods[m]) for c in ("topp", "topk") if c in wanted for m in methods]

    greedy_iter, table = {}, []
    for cfg_name, m_name, method in runs:
        cfg = CONFIGS[cfg_name]
        f = looped(cfg, method)
        for case, z in cases.items():
            t0 = time.perf_counter()
            ms_call = timed(f, z, rng, 1, reps=args.reps)
            ms_iter = timed(f, z, rng, args.iters, reps=args.loop_reps) / args.iters
            row = dict(config=cfg_name, method=m_name, case=case, ms_call=round(ms_call, 4))
            row["ms_iter"] = round(ms_iter, 4)
            if cfg_name == "greedy":
                greedy_iter[case] = ms_iter
            if case in greedy_iter:
                row["extra_ms_iter"] = round(ms_iter - greedy_iter[case], 4)
            if method is not None:
                row.update(check(cfg, method, z, rng))
            row["wall_s"] = round(time.perf_counter() - t0, 1)
            print(json.dumps(row), flush=True)
            table.append(row)

    print("\nextra ms per step over greedy (fori_loop), kept set == radix:")
    for r in table:
        ok = r.get("kept_equal", "")
        print(f"  {r['config']:6s} {r['method']:14s} {r['case']:6s} {r.get('extra_ms_iter', 0):8.4f} {ok}")


if __name__ == "__main__":
    main()
