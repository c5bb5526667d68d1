"""The top-p radix-pass kernels (jaxrlhf._sampling_kernel) alone on the GPU: time per call at [B, V] for a
sweep of (block, programs per row, num_warps, num_stages), beside the XLA passes, and the rows whose kept set
differs from the XLA search's.

    python3 benchmarks/topp_kernel_gpu.py [--batch 64] [--vocab 128256] [--settings 256,8,4,1 128,16,4,1 ...]

One JSON line per (case, setting); "xla" is jaxrlhf._sampling._threshold over the softmax (8 XLA passes).
"""

from __future__ import annotations

import argparse
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

SETTINGS = ["256,8,4,1,3", "256,8,4,1,8", "128,16,4,1,3", "512,8,8,1,3", "256,16,8,1,2"]


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
    args = ap.parse_args()
    card = jax.devices()[0].device_kind
    for case, scale in (("flat", 0.5), ("peaked", 3.0)):
        x = jax.random.normal(jax.random.key(0), (args.batch, args.vocab), jnp.float32) * scale
        keys = _ordered_keys(x)

        def xla(z):
            return _threshold(_ordered_keys(z), jax.nn.softmax(z, axis=-1), jnp.float32(args.top_p))

        want = np.asarray(jax.jit(xla)(x))
        us = timed(xla, x, args.iters)
        print(json.dumps(dict(case=case, setting="xla", us_per_call=round(us, 1), card=card)), flush=True)
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
