"""The top-p radix-pass kernels (jaxrlhf._sampling_kernel) alone on the GPU: time per call at [B, V] for a
sweep of (block, programs per row, num_warps, num_stages), beside the XLA passes, and the rows whose kept set
differs from the XLA search's.

    python3 benchmarks/topp_kernel_gpu.py [--batch 64] [--vocab 128256] [--settings 256,8,4,1 128,16,4,1 ...]

One JSON line per (case, setting); "xla" is jaxrlhf._sampling._threshold over the softmax (8 XLA passes).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxrlhf._sampling import _ordered_keys, _threshold  # noqa: E402
from jaxrlhf._sampling_kernel import top_p_threshold  # noqa: E402

SETTINGS = [  # block, groups, warps, stages, skip[, unroll[, grid[, pred]]]
    "256,16,4,1,3,4",
    "256,16,4,1,3,8",
    "256,16,4,1,3,4,0,1",
    "256,16,4,1,2,4,1",
    "256,16,4,1,2,4,1,1",
    "256,16,4,1,2,8,1,1",
    "256,32,4,1,2,4,1,1",
    "128,32,4,1,2,8,1,1",
    "512,16,8,1,2,4,1,1",
    "256,16,4,1,1,4,1,1",
    "256,16,8,1,2,4,1,1",
]


def floor_kernel(x: jax.Array, block: int, groups: int, warps: int, what: str) -> jax.Array:
    """Diagnostic (not a threshold): one pass with the kernels' grid and loads (``_blocks``, one block per
    iteration) doing only ``what`` per key, "read" (sum x) or "exp" (sum of exp(x - m) over keys >= 0: the
    loads, weights and int keys of a pass without the 16 compares), to tell a pass' memory / latency floor
    from its compute."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    from jaxrlhf._sampling_kernel import _blocks, _signed_keys

    rows, vocab = x.shape
    n_blocks = -(-vocab // block)
    per = -(-n_blocks // groups)

    def kernel(x_ref, m_ref, o_ref):
        load = _blocks(x_ref, pl.program_id(1), vocab=vocab, block=block, per=per, unroll=1, evict=True)
        m = jnp.max(m_ref[...])

        def body(i, acc):
            ((keep, v),) = load(i)
            if what == "read":
                return acc + jnp.where(keep, v, 0.0)
            return acc + jnp.where(keep & (_signed_keys(v) >= 0), jnp.exp(v - m), 0.0)

        o_ref[...] = jnp.broadcast_to(jnp.sum(jax.lax.fori_loop(0, per, body, jnp.zeros((1, block)))), (16,))

    m = jnp.broadcast_to(jnp.max(x, axis=-1, keepdims=True), (rows, 16))
    out = pl.pallas_call(
        kernel,
        grid=(rows, groups),
        in_specs=[
            pl.BlockSpec((None, 1, vocab), lambda i, j: (i, 0, 0)),
            pl.BlockSpec((None, 16), lambda i, j: (i, 0)),
        ],
        out_specs=pl.BlockSpec((None, None, 16), lambda i, j: (i, j, 0)),
        out_shape=jax.ShapeDtypeStruct((rows, groups, 16), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=1),
    )(x[:, None, :], m)
    return out[:, :, 0].sum(axis=1)


def timed(f, x, iters: int) -> float:
    """Median over 5 runs of a jitted fori_loop of ``iters`` calls (x shifted per step), per call, in us."""

    @jax.jit
    def loop(x):
        def body(i, acc):
            tau = f(x + i.astype(jnp.float32) * 1e-3)
            return acc + tau.astype(jnp.float32)

        return jax.lax.fori_loop(0, iters, body, jnp.zeros(x.shape[:1], jnp.float32))

    jax.block_until_ready(loop(x))
    runs = []
    for _ in range(5):
        t = time.perf_counter()
        jax.block_until_ready(loop(x))
        runs.append(time.perf_counter() - t)
    return float(np.median(runs)) / iters * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--iters", type=int, default=64)
    ap.add_argument("--settings", nargs="+", default=SETTINGS)
    ap.add_argument("--floor", action="store_true", help="also time one-pass floor kernels (diagnostic)")
    args = ap.parse_args()
    card = jax.devices()[0].device_kind
    for case, scale in (("flat", 0.5), ("peaked", 3.0), ("subnormal", 0.0)):
        if case == "subnormal":  # every value subnormal or zero: the threshold lies among subnormals
            bits = jax.random.randint(
                jax.random.key(0), (args.batch, args.vocab), -(2**23) + 1, 2**23, jnp.int32
            )
            bits = jnp.where(bits < 0, (-bits) | jnp.int32(-(2**31)), bits)  # sign-magnitude
            x = jax.lax.bitcast_convert_type(bits, jnp.float32)
        else:
            x = jax.random.normal(jax.random.key(0), (args.batch, args.vocab), jnp.float32) * scale
        keys = _ordered_keys(x)

        def xla(z):
            return _threshold(_ordered_keys(z), jax.nn.softmax(z, axis=-1), jnp.float32(args.top_p))

        want = np.asarray(jax.jit(xla)(x))
        us = timed(xla, x, args.iters)
        print(json.dumps(dict(case=case, setting="xla", us_per_call=round(us, 1), card=card)), flush=True)
        mx = jax.jit(lambda z: jnp.max(z, axis=-1))
        us = timed(mx, x, args.iters)
        print(json.dumps(dict(case=case, setting="xla row max alone", us_per_call=round(us, 1))), flush=True)
        if args.floor and case == "flat":
            for what in ("read", "exp"):
                for block, groups, warps in ((256, 16, 4), (256, 32, 4), (512, 16, 8), (1024, 16, 8)):
                    row = dict(case=case, floor=what, block=block, groups=groups, warps=warps)
                    try:
                        fn = functools.partial(
                            floor_kernel, block=block, groups=groups, warps=warps, what=what
                        )
                        row["us_per_pass"] = round(timed(fn, x, args.iters), 1)
                    except Exception as e:  # noqa: BLE001 (a diagnostic: report and go on)
                        row["error"] = str(e).splitlines()[0][:200]
                    print(json.dumps(row), flush=True)
        for raw in args.settings:
            setting = tuple(int(v) for v in raw.split(","))

            def kern(z, setting=setting):
                return top_p_threshold(z, args.top_p, setting=setting)[0]

            try:
                got = np.asarray(jax.jit(kern)(x))
                us = timed(kern, x, args.iters)
            except Exception as e:  # a setting Triton refuses (registers, shapes): report, go on
                print(
                    json.dumps(dict(case=case, setting=raw, error=str(e).splitlines()[0][:200])), flush=True
                )
                continue
            kept_diff = int(np.sum(np.any(np.asarray(keys) >= got[:, None], axis=1) != True))  # noqa: E712
            print(
                json.dumps(
                    dict(
                        case=case,
                        setting=raw,
                        us_per_call=round(us, 1),
                        rows_differing=int(np.sum(got != want)),
                        empty_rows=kept_diff,
                        card=card,
                    )
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
