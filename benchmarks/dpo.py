"""The DPO stage's own train step on a Llama-3.2-1B-shaped model (random weights, random token pairs).

Built as ``jaxrlhf.stages.dpo.run`` builds it: a preference ``TokenizedDataset`` (``chosen_`` / ``rejected_``
ids and masks, loss on the completion), the reference log-probs precomputed by the stage's own
``dpo.precompute_reference`` pass (``--reference precompute``, the stage default) or computed in the step
from a frozen copy of the starting weights (``--reference on_the_fly``; LoRA: the base without adapters),
``dpo.make_loss_fn`` (each pair one shared-prompt row ``[prompt | chosen | rejected]`` of ``dpo.pair_shape``
as the stage builds it, or with ``--unshared`` chosen and rejected concatenated into one ``[2B, T]``
forward; chunked LM head) under
``train.make_train_step`` / ``train.jit_train_step`` with the stage's optimizer defaults, and a batch from
``data.Loader`` through ``runner.Batches``. One JSON line per run: tokens/s (chosen + rejected tokens per
step / step time, as the TRL baseline counts them), pairs/s, step time, device ``peak_bytes_in_use``, card.

Compare with ``trl_dpo_llama1b.py --pairs 8 --prompt-len 512 --completion-len 512 [--precompute-ref]`` run
in the same call (``benchmarks/run_rl_suite.sh``). Run each reference mode in its own process (the peak
memory is the process's).

  PYTHONPATH=. python3 benchmarks/dpo.py --reference precompute     # 8 pairs x (512 + 512), bf16 compute
  PYTHONPATH=. python3 benchmarks/dpo.py --reference on_the_fly
  PYTHONPATH=. python3 benchmarks/dpo.py --reference on_the_fly --lora-rank 16 --param-dtype bfloat16
  PYTHONPATH=. python3 benchmarks/dpo.py --tiny                     # CPU smoke run: tiny shape, 2 x (16+16)
"""

from __future__ import annotations

import argparse
import json
import time

import datasets
import jax
import numpy as np
from sft import ALL_LINEAR, LLAMA_1B, TINY  # benchmarks/sft.py (this directory is on sys.path)

from jaxrlhf import data, models, sharding
from jaxrlhf import lora as lora_lib
from jaxrlhf import train as train_lib
from jaxrlhf.stages import common, dpo, runner
from jaxrlhf.stages.common import ModelConfig

SPECIAL = dict(bos_token_id=0, eos_token_ids=(1,), pad_token_id=2)  # as the TRL baseline's model


def pair_dataset(n: int, prompt_len: int, completion_len: int, vocab: int, seed: int = 1):
    """``n`` random pairs as the stage's preference ``TokenizedDataset``: every row ``prompt ++ completion``
    (``prompt_len + completion_len`` tokens), ``loss_mask`` 1 on the completion."""
    r = np.random.default_rng(seed)
    hi = min(32000, vocab)
    prompt = r.integers(4, hi, (n, prompt_len))
    mask = [[0] * prompt_len + [1] * completion_len] * n
    cols = {"margin": [0.0] * n}
    for side in ("chosen", "rejected"):
        ids = np.concatenate([prompt, r.integers(4, hi, (n, completion_len))], axis=1)
        cols[f"{side}_input_ids"] = ids.astype(np.int32).tolist()
        cols[f"{side}_loss_mask"] = mask
    t = prompt_len + completion_len
    return data.TokenizedDataset(
        data=datasets.Dataset.from_dict(cols), kind="preference", format="preference",
        pad_token_id=SPECIAL["pad_token_id"], max_length=t, buckets=(t,),
    )  # fmt: skip


def run(args) -> dict:
    spec = (TINY if args.tiny else LLAMA_1B).replace(**SPECIAL)
    t = args.prompt_len + args.completion_len
    lcfg = None
    if args.lora_rank:
        lcfg = lora_lib.LoraConfig(rank=args.lora_rank, alpha=args.lora_rank, targets=ALL_LINEAR)
    cfg = dpo.DPOConfig(
        data=data.DataConfig(path="bench", max_length=t, batch_size=args.pairs, shuffle=False),
        model=ModelConfig(dtype=args.param_dtype, compute_dtype="bfloat16", attention_impl="auto"),
        lora=lcfg,
        train=dpo.DPOTrainConfig(beta=0.1, loss_type="sigmoid", reference=args.reference),
    )
    mesh = sharding.make_mesh(1, -1, 1)
    compute_dtype = common.dtype_of(cfg.model.compute_dtype)
    params = models.init_params(spec, jax.random.PRNGKey(0), common.dtype_of(cfg.model.dtype), mesh=mesh)
    ds = pair_dataset(args.pairs * 4, args.prompt_len, args.completion_len, spec.vocab_size)
    precompute = cfg.train.reference == "precompute"
    shape = None if args.unshared else dpo.pair_shape(ds)  # as dpo.run: shared-prompt rows from the data
    t_ref = 0.0
    if precompute:  # the stage's own pass (its time includes compiling it)
        t0 = time.perf_counter()
        ds = dpo.precompute_reference(
            spec, params, ds, args.pairs, mesh, compute_dtype=compute_dtype, shape=shape
        )
        t_ref = time.perf_counter() - t0
    axes = models.param_axes(spec)
    if lcfg is not None:  # as dpo.run: f32 adapters, the base frozen (and the reference)
        trainable = lora_lib.init(spec, params, lcfg, jax.random.PRNGKey(1), dtype=common.ADAPTER_DTYPE)
        t_axes, frozen = lora_lib.param_axes(axes, trainable), params
    else:
        frozen = jax.tree.map(lambda x: x.copy(), params) if not precompute else None
        trainable, t_axes = params, axes
    del params
    loss_fn = dpo.make_loss_fn(spec, cfg, lcfg, prefix_len=0, shape=shape)
    optim = cfg.optim
    opt = train_lib.make_optimizer(optim)
    state, shard = train_lib.init_train_state(
        trainable, opt, jax.random.PRNGKey(2), mesh=mesh, params_axes=t_axes
    )
    del trainable
    step = train_lib.jit_train_step(
        train_lib.make_train_step(
            loss_fn, opt, grad_accum=optim.grad_accum, schedule=train_lib.make_schedule(optim)
        ),
        shard,
        mesh=mesh,
        grad_accum=optim.grad_accum,
    )
    loader = data.Loader(ds, args.pairs, seed=0, shuffle=False)
    host = next(iter(loader))
    batch = next(runner.Batches(iter([host]), mesh, optim.grad_accum))
    t0 = time.perf_counter()
    for _ in range(2):  # compile + warm-up
        state, metrics = step(state, batch, frozen)
    float(metrics["loss"])
    t_compile = time.perf_counter() - t0
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, metrics = step(state, batch, frozen)
        float(metrics["loss"])
        times.append(time.perf_counter() - t0)
    dt = float(np.median(times))
    tokens = 2 * args.pairs * t
    stats = jax.devices()[0].memory_stats() or {}
    return dict(
        bench="jaxrlhf-dpo-stage-step",
        shape="tiny" if args.tiny else "llama1b",
        reference=args.reference,
        pair_rows=list(shape) if shape is not None else None,
        lora=args.lora_rank,
        param_dtype=args.param_dtype,
        pairs=args.pairs,
        prompt_len=args.prompt_len,
        completion_len=args.completion_len,
        step_s=dt,
        tokens_per_s=tokens / dt,
        pairs_per_s=args.pairs / dt,
        steps=[round(x, 4) for x in times],
        reference_pass_s=t_ref,
        reference_pairs=len(ds.data) if precompute else 0,
        loss=float(metrics["loss"]),
        peak_gib=stats.get("peak_bytes_in_use", 0) / 2**30,
        compile_s=t_compile,
        devices=len(jax.devices()),
        card=jax.devices()[0].device_kind,
    )


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", choices=["precompute", "on_the_fly"], default="precompute")
    p.add_argument("--tiny", action="store_true", help="tiny model, 2 pairs x (16 + 16): a CPU smoke run")
    p.add_argument("--pairs", type=int, default=None)
    p.add_argument("--prompt-len", type=int, default=None)
    p.add_argument("--completion-len", type=int, default=None)
    p.add_argument("--steps", type=int, default=5, help="timed steps after 2 warm-up steps (median)")
    p.add_argument("--lora-rank", type=int, default=0, help="0 = full fine-tuning")
    p.add_argument("--param-dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument(
        "--unshared", action="store_true", help="chosen + rejected as [2B, T] rows (the prompt twice)"
    )
    args = p.parse_args()
    args.pairs = args.pairs or (2 if args.tiny else 8)
    args.prompt_len = args.prompt_len or (16 if args.tiny else 512)
    args.completion_len = args.completion_len or (16 if args.tiny else 512)
    print(json.dumps(run(args)), flush=True)


if __name__ == "__main__":
    main()
