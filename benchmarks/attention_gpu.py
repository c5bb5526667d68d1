"""GPU check of the fused attention's segment layout (issue 16): parity with the dense-mask plain path, then
the attention op's own fwd + bwd time under each mask form.

    PYTHONPATH=. python3 benchmarks/attention_gpu.py            # GPU (bf16, cuDNN)
    PYTHONPATH=. python3 benchmarks/attention_gpu.py --tiny     # CPU smoke run (the dense fallback)

Parity (one JSON line per case, a tiny Llama in bf16 and f32 reference): logits of
``models.forward(attention_impl="fused", max_segments=M)`` against ``attention_impl="plain"`` (the dense
``[B, 1, T, T]`` mask) on packed rows (several segments, padding tail, one empty row), left-padded rows and a
sliding window; gradients of a masked loss w.r.t. every weight. Timing: ``attend`` fwd + bwd at the
1.24B Llama's attention shape (32 q heads / 8 kv, head dim 64, 8 x 2048): causal without mask, a dense
packed mask, and the segment layout at several ``max_segments``.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf import models
from jaxrlhf.models import attention
from jaxrlhf.models.spec import ModelSpec

TINY_LLAMA = dict(
    model_type="llama", vocab_size=512, hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
    head_dim=64, intermediate_size=512, max_position_embeddings=4096, rope_theta=10000.0, norm_eps=1e-5,
)  # fmt: skip


def packed_rows(b: int, t: int, seed: int, max_seg: int):
    """Segment ids / positions of packed rows (1..k, padded tail), row 0 one segment, last row empty."""
    r = np.random.default_rng(seed)
    seg = np.zeros((b, t), np.int32)
    pos = np.zeros((b, t), np.int32)
    for i in range(b - 1):
        j, s = 0, 0
        while j < t and s < (1 if i == 0 else max_seg):
            n = int(r.integers(t // 8, t // 2)) if i else t - int(r.integers(0, t // 4))
            n = min(n, t - j)
            s += 1
            seg[i, j : j + n] = s
            pos[i, j : j + n] = np.arange(n)
            j += n
            if r.random() < 0.3:
                break  # a padded tail
    return jnp.asarray(seg), jnp.asarray(pos)


def parity(args) -> list[dict]:
    out = []
    b, t = (3, 64) if args.tiny else (4, 1024)
    for window in (None, t // 4):
        spec = ModelSpec(**TINY_LLAMA, sliding_window=window)
        params = models.init_params(spec, jax.random.key(0))
        ids = jax.random.randint(jax.random.key(1), (b, t), 3, spec.vocab_size, jnp.int32)
        seg, pos = packed_rows(b, t, 2, 6)
        starts = np.array([0, t // 3, t - 5, t])[:b, None]
        left = jnp.asarray((np.arange(t)[None, :] >= starts).astype(np.int32))
        cases = {
            "packed": dict(positions=pos, segment_ids=seg, m=8, real=seg != 0),
            "left_padded": dict(attention_mask=left, m=1, real=left != 0),
        }
        for name, c in cases.items():
            kw = {k: v for k, v in c.items() if k in ("positions", "segment_ids")}
            am = c.get("attention_mask")
            real = np.asarray(c["real"])

            def loss(p, impl, m, kw=kw, am=am, real=real, spec=spec, ids=ids):
                lg = models.forward(
                    spec, p, ids, am, **kw, attention_impl=impl, compute_dtype=jnp.bfloat16,
                    max_segments=m,
                ).logits  # fmt: skip
                w = jnp.asarray(real, jnp.float32)[:, :, None]
                return (jnp.where(w > 0, lg, 0.0) ** 2 * w).sum() / w.sum(), lg

            plain = jax.jit(jax.value_and_grad(lambda p, loss=loss: loss(p, "plain", None), has_aux=True))
            fused = jax.jit(
                jax.value_and_grad(lambda p, loss=loss, m=c["m"]: loss(p, "fused", m), has_aux=True)
            )
            (l_p, lg_p), g_p = plain(params)
            (l_f, lg_f), g_f = fused(params)
            lg_p, lg_f = np.asarray(lg_p)[real], np.asarray(lg_f)[real]
            gp = np.concatenate([np.ravel(x) for x in jax.tree.leaves(g_p)])
            gf = np.concatenate([np.ravel(x) for x in jax.tree.leaves(g_f)])
            out.append(
                dict(
                    bench="attention-parity", case=name, window=window, batch=b, seq=t,
                    max_logit_abs_diff=float(np.abs(lg_p - lg_f).max()),
                    logit_scale=float(np.abs(lg_p).max()),
                    loss_plain=float(l_p), loss_fused=float(l_f),
                    grad_rel_err=float(np.linalg.norm(gp - gf) / max(np.linalg.norm(gp), 1e-30)),
                    all_finite=bool(np.isfinite(gf).all() and np.isfinite(lg_f).all()),
                    card=jax.devices()[0].device_kind,
                )
            )  # fmt: skip
    return out


def timing(args) -> list[dict]:
    b, t, h, k, d = (2, 128, 4, 2, 16) if args.tiny else (8, 2048, 32, 8, 64)
    dt = jnp.float32 if args.tiny else jnp.bfloat16
    r = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(r[0], (b, t, h, d), dt)
    kk = jax.random.normal(r[1], (b, t, k, d), dt)
    v = jax.random.normal(r[2], (b, t, k, d), dt)
    seg, _ = packed_rows(b + 1, t, 3, 6)
    seg = seg[:b]
    dense = attention.make_mask(jnp.arange(t), jnp.arange(t), seg != 0, q_segment=seg, kv_segment=seg)
    forms = {"causal_no_mask": (None, True), "dense_packed_mask": (dense, False)}
    for m in (8, 32, 64):
        forms[f"segments_m{m}"] = ("layout", m)
    out = []
    for name, (mask, extra) in forms.items():

        def f(q, kk, v, mask=mask, extra=extra):
            if isinstance(mask, str):
                mk = attention.segment_layout(seg, extra)
                o = attention.attend(q, kk, v, mk, scale=d**-0.5, impl="fused")
            else:
                o = attention.attend(q, kk, v, mask, scale=d**-0.5, impl="fused", is_causal=extra)
            return jnp.sum(o.astype(jnp.float32) ** 2)

        step = jax.jit(jax.grad(f, argnums=(0, 1, 2)))
        jax.block_until_ready(step(q, kk, v))
        n = 3 if args.tiny else 20
        t0 = time.perf_counter()
        for _ in range(n):
            res = step(q, kk, v)
        jax.block_until_ready(res)
        ms = (time.perf_counter() - t0) / n * 1e3
        out.append(dict(bench="attention-fwd-bwd", form=name, batch=b, seq=t, ms=ms,
                        real_fraction=float(np.mean(np.asarray(seg) != 0)),
                        card=jax.devices()[0].device_kind))  # fmt: skip
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args()
    for row in parity(args) + timing(args):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
