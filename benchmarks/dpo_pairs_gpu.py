"""GPU check of DPO's shared-prompt rows (``dpo.pack_pairs`` / ``models.PairLayout``): on the fused path the
two virtual rows per pair go through cuDNN's packed-segment kernel; their log-probs and gradients must match
the concatenated ``[2B, T]`` rows (the same kernel without sharing) and an f32 plain-attention reference.

    PYTHONPATH=. python3 benchmarks/dpo_pairs_gpu.py           # GPU: bf16 compute, cuDNN
    PYTHONPATH=. python3 benchmarks/dpo_pairs_gpu.py --tiny    # CPU smoke run (the XLA fallback)

One JSON line per compute dtype: max |logp difference| (shared vs unshared, and each vs the f32 plain
reference), relative gradient error, and finiteness.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf import models
from jaxrlhf.models.spec import ModelSpec
from jaxrlhf.stages import dpo

TINY_LLAMA = dict(
    model_type="llama", vocab_size=512, hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
    head_dim=64, intermediate_size=512, max_position_embeddings=4096, rope_theta=10000.0, norm_eps=1e-5,
    pad_token_id=0, bos_token_id=1, eos_token_ids=(2,),
)  # fmt: skip


def pairs(b: int, t: int, seed: int) -> dict:
    """Random pairs: prompts of 1..t/2 tokens, responses filling up to t; pair 1 shares only part of its
    prompt, pair 2 none."""
    r = np.random.default_rng(seed)
    out = {}
    prompts = [r.integers(3, 512, r.integers(1, t // 2)).tolist() for _ in range(b)]
    for side in ("chosen", "rejected"):
        ids, att, loss = (np.zeros((b, t), np.int32) for _ in range(3))
        for i, p in enumerate(prompts):
            p = list(p)
            if side == "rejected" and i == 1:
                p[len(p) // 2 :] = r.integers(3, 512, len(p) - len(p) // 2).tolist()
            if side == "rejected" and i == 2:
                p = r.integers(3, 512, len(p)).tolist()
            row = p + r.integers(3, 512, r.integers(1, t - len(p) + 1)).tolist()
            ids[i, : len(row)], att[i, : len(row)], loss[i, len(p) : len(row)] = row, 1, 1
        out |= {f"{side}_input_ids": ids, f"{side}_attention_mask": att, f"{side}_loss_mask": loss}
    return {k: jnp.asarray(v) for k, v in out.items()}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args()
    b, t = (4, 64) if args.tiny else (8, 1024)
    spec = ModelSpec(**TINY_LLAMA)
    params = models.init_params(spec, jax.random.key(0))
    batch = pairs(b, t, 0)
    shape = dpo.PairShape(2 * t, t)
    w = jnp.linspace(0.5, 1.5, 2 * b)

    def run(dtype, impl, shaped):
        def f(p):
            lp, _ = dpo.pair_logps(
                spec, p, batch, shape=shape if shaped else None, compute_dtype=dtype, attention_impl=impl,
                max_segments=1,
            )  # fmt: skip
            return jnp.sum(lp * w), lp

        (_, lp), g = jax.jit(jax.value_and_grad(f, has_aux=True))(params)
        return np.asarray(lp), jax.tree.leaves(g)

    with jax.default_matmul_precision("highest"):
        ref_lp, ref_g = run(None, "plain", False)
    dtype = None if args.tiny else jnp.bfloat16
    got = {name: run(dtype, "fused", shaped) for name, shaped in (("shared", True), ("unshared", False))}

    def rel(g, r):
        err = []
        for a, c in zip(g, r, strict=True):
            a, c = np.asarray(a), np.asarray(c)
            err.append(np.linalg.norm(a - c) / (np.linalg.norm(c) + 1e-30))
        return float(max(err))

    rec = dict(
        bench="dpo-pairs-gpu", card=jax.devices()[0].device_kind, compute_dtype=str(dtype), pairs=b, t=t,
        shared=np.asarray(dpo.pack_pairs(batch, shape)[2].shared).tolist(),
        logp_range=[float(ref_lp.min()), float(ref_lp.max())],
        shared_vs_unshared_max_abs=float(np.abs(got["shared"][0] - got["unshared"][0]).max()),
        shared_vs_f32_max_abs=float(np.abs(got["shared"][0] - ref_lp).max()),
        unshared_vs_f32_max_abs=float(np.abs(got["unshared"][0] - ref_lp).max()),
        grad_rel_shared_vs_f32=rel(got["shared"][1], ref_g),
        grad_rel_unshared_vs_f32=rel(got["unshared"][1], ref_g),
        grad_rel_shared_vs_unshared=rel(got["shared"][1], got["unshared"][1]),
        finite=bool(all(np.isfinite(x[0]).all() for x in got.values())),
    )  # fmt: skip
    print(json.dumps(rec))


if __name__ == "__main__":
    main()
