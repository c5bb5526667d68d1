"""Reward-model training throughput of jaxrlhf on a Llama-3.2-1B-shaped model (random weights and tokens).

One train step = one forward pass over the 2B concatenated chosen + rejected rows, the Bradley-Terry loss,
backward, AdamW. One JSON line per mode: tokens/s (both halves counted), pairs/s, step time,
MFU = (6N + 6 L T E) * tokens/s / peak (the card's dense bf16 peak from ``train.peak_flops``; 989e12 when
unknown, like the SFT benchmark), peak device memory and the card. The unused LM-head logits are removed by
XLA (the head reads the final hidden states only), so N excludes nothing and the MFU is conservative.

    PYTHONPATH=. python benchmarks/rm.py             # GPU: 8 pairs x 1024, bf16 compute, full + LoRA
    PYTHONPATH=. python benchmarks/rm.py --tiny      # CPU smoke run
    options: --mode full|lora|both  --pairs 8  --seq 1024  --remat none|full|save_dots
             --attention fused|plain  --param-dtype float32|bfloat16  --lora-rank 16  --steps 5

The reward-model STAGE's own step (``--stage-config``; see :func:`stage_step`): the ``RMConfig`` of a YAML
file (``jaxrlhf.config.load_config``, ``--set k=v`` overrides), the stage's preference loader, its
``rm.make_loss_fn`` over shared-prompt pair rows ``[prompt | chosen | rejected]`` of ``pair_shape(data)``,
its head / LoRA / optimizer construction and ``runner.train``'s jitted step, nothing of this file's own:

    PYTHONPATH=. python benchmarks/rm.py --stage-config benchmarks/configs/rm_llama1b.yaml [--set k=v ...]
    PYTHONPATH=. python benchmarks/rm.py --stage-config benchmarks/configs/rm_llama1b.yaml --tiny  # CPU
        --steps N timed steps after 1 compile step + --warmup W (default 1) untimed ones

Its peer: ``benchmarks/peers/trl_rm_llama1b.py`` (TRL's RewardTrainer, the same pair lengths).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf import lora, losses, models, reward_model, sharding, train
from jaxrlhf.models import heads

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
    pad_token_id=0,
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
    def loss_fn(trainable, frozen, batch, rng):
        base = trainable["params"] if lora_config is None else frozen
        r_c, r_r = reward_model.score_pairs(
            spec,
            base,
            trainable["head"],
            batch,
            lora=trainable.get("lora"),
            lora_config=lora_config,
            compute_dtype=jnp.bfloat16,
            attention_impl=args.attention,
            remat=args.remat,
        )
        loss, m = losses.reward_loss(r_c, r_r, margin=batch["margin"])
        return loss, {"accuracy": m["accuracy"]}

    return loss_fn


def make_batch(spec, pairs: int, seq: int) -> dict:
    keys = jax.random.split(jax.random.PRNGKey(2), 2)
    batch = {"margin": jnp.zeros((pairs,), jnp.float32)}
    for side, key in zip(("chosen", "rejected"), keys, strict=True):
        batch[f"{side}_input_ids"] = jax.random.randint(key, (pairs, seq), 1, spec.vocab_size, jnp.int32)
        batch[f"{side}_attention_mask"] = jnp.ones((pairs, seq), jnp.int32)
    return batch


def run(mode: str, args) -> dict:
    spec = TINY if args.tiny else LLAMA_1B
    mesh = sharding.make_mesh(data=1, fsdp=-1, tensor=1)
    axes = models.param_axes(spec)
    opt = train.make_optimizer(
        train.OptimConfig(lr=1e-5, schedule="constant", weight_decay=0.0, clip_norm=1.0)
    )
    rng = jax.random.PRNGKey(0)
    head = heads.init_head(spec, jax.random.PRNGKey(3))
    if mode == "full":
        params = models.init_params(spec, rng, dtype=jnp.dtype(args.param_dtype), mesh=mesh)
        trainable, frozen, t_axes = {"params": params, "head": head}, None, {"params": axes}
        cfg = None
    else:
        cfg = lora.LoraConfig(rank=args.lora_rank, alpha=args.lora_rank, targets=ALL_LINEAR)
        frozen = models.init_params(spec, rng, dtype=jnp.bfloat16, mesh=mesh)  # frozen shared base in bf16
        adapters = lora.init(spec, frozen, cfg, jax.random.PRNGKey(1))
        trainable = {"lora": adapters, "head": head}
        t_axes = {"lora": lora.param_axes(axes, adapters)}
    t_axes["head"] = heads.head_axes()
    state, shard = train.init_train_state(trainable, opt, 0, mesh=mesh, params_axes=t_axes)
    step = train.make_train_step(
        make_loss(spec, args, cfg), opt, param_compute_dtype=jnp.bfloat16 if mode == "full" else None
    )
    step = train.jit_train_step(step, shard, mesh=mesh)
    batch = make_batch(spec, args.pairs, args.seq)
    t_compile = time.perf_counter()
    for _ in range(2):  # compile + warm-up
        state, metrics = step(state, batch, frozen)
    float(metrics["loss"])
    t_compile = time.perf_counter() - t_compile
    t = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = step(state, batch, frozen)
    loss = float(metrics["loss"])
    dt = (time.perf_counter() - t) / args.steps
    tokens = 2 * args.pairs * args.seq / dt
    n_params = models.count_params(spec)
    fpt = train.flops_per_token(n_params, spec.num_layers, args.seq, spec.hidden_size)
    card = jax.devices()[0].device_kind
    peak = train.peak_flops(card) or 989e12
    stats = jax.devices()[0].memory_stats() or {}
    return dict(
        bench="jaxrlhf-rm",
        mode=mode,
        lora=args.lora_rank if mode == "lora" else 0,
        pairs=args.pairs,
        seq=args.seq,
        remat=args.remat,
        attention=args.attention,
        param_dtype=args.param_dtype,
        n_params=n_params,
        tokens_per_s=tokens,
        pairs_per_s=args.pairs / dt,
        step_ms=dt * 1e3,
        model_tflops=fpt * tokens / 1e12,
        mfu=fpt * tokens / peak,
        peak_flops=peak,
        peak_gib=stats.get("peak_bytes_in_use", 0) / 2**30,
        loss=loss,
        compile_s=t_compile,
        devices=len(jax.devices()),
        card=card,
    )


# ------------------------------------------------------------------------------------- the stage's own step

# --tiny with --stage-config: a tiny model and short pairs over the same config (a CPU smoke run)
STAGE_TINY = [
    "model.spec.vocab_size=512",
    "model.spec.hidden_size=64",
    "model.spec.num_layers=2",
    "model.spec.num_heads=4",
    "model.spec.num_kv_heads=2",
    "model.spec.head_dim=16",
    "model.spec.intermediate_size=128",
    "data.max_length=128",
    "data.batch_size=2",
]


def pair_lengths(n: int, max_length: int, seed: int = 0) -> np.ndarray:
    """``[n, 3]`` token counts (prompt, chosen, rejected) of the bench pairs, without BOS / EOS: with
    h = max_length // 2, prompts in [7h/8, h], responses in [25h/32, h - 2] (1024: 448-512 and 400-510), so
    BOS + prompt + response + EOS fits ``max_length`` and no prompt is cut (the loader would cut the two rows
    of a pair differently). ``benchmarks/peers/trl_rm_llama1b.py`` draws the same lengths."""
    h = max_length // 2
    r = np.random.default_rng(seed)
    prompt = r.integers(h - h // 8, h + 1, n)
    resp = r.integers(h * 25 // 32, h - 1, (n, 2))
    return np.concatenate([prompt[:, None], resp], axis=1)


def write_pref_data(path: str, tokenizer, max_length: int, n: int = 512, seed: int = 0) -> str:
    """``n`` ``{"prompt", "chosen", "rejected"}`` rows of words from the tiny corpus, each text exactly its
    :func:`pair_lengths` count of ``tokenizer`` tokens (words are added while they fit, then one-token
    words; the tiny SentencePiece model never merges across spaces, so counts add up per word)."""
    import jaxrlhf

    corpus = os.path.join(os.path.dirname(jaxrlhf.__file__), "assets", "tiny", "corpus.txt")
    words = sorted(set(open(corpus).read().split()))
    cost = np.asarray([len(tokenizer.encode(w)) for w in words])
    ones = [w for w, c in zip(words, cost, strict=True) if c == 1]
    r = np.random.default_rng(seed + 1)

    def text(k: int) -> str:
        out, left = [], k
        while left > 0:
            i = int(r.integers(len(words)))
            if cost[i] <= left:
                out.append(words[i])
                left -= int(cost[i])
            elif ones:
                out.append(ones[int(r.integers(len(ones)))])
                left -= 1
            else:
                break
        return " ".join(out)

    with open(path, "w") as f:
        for p, c, rj in pair_lengths(n, max_length, seed):
            row = {"prompt": text(int(p)), "chosen": text(int(c)), "rejected": text(int(rj))}
            while row["rejected"] == row["chosen"]:
                row["rejected"] = text(int(rj))
            f.write(json.dumps(row) + "\n")
    return path


def build_rm_stage_step(config_path: str, overrides: list[str]):
    """The RM stage's own step, built as ``jaxrlhf.stages.rm.run`` + ``runner.train`` build it:
    ``(jitted step, state, device batch, frozen, host batch, config, spec, pair shape)``."""
    from jaxrlhf import data
    from jaxrlhf.config import load_config
    from jaxrlhf.pairs import pair_shape
    from jaxrlhf.stages import common, runner
    from jaxrlhf.stages import rm as rm_stage

    work = tempfile.mkdtemp(prefix="jaxrlhf-bench-rm-")
    extra = [f"output_dir={work}/run", f"tokenizer.cache_dir={work}/tok", f"data.cache_dir={work}/data"]
    raw = load_config(rm_stage.RMConfig, config_path, [*overrides, *extra])
    if raw.data.path == "bench":
        tok = common.load_tokenizer(raw.tokenizer, common.resolve_path(raw.model.path), work)
        bench = write_pref_data(os.path.join(work, "bench.jsonl"), tok, raw.data.max_length)
        extra.append(f"data.path={bench}")
    cfg = load_config(rm_stage.RMConfig, config_path, [*overrides, *extra])
    t0 = time.perf_counter()

    def say(what):
        print(f"[rm-stage-step] {what} at {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)

    # jaxrlhf.stages.rm.run, up to runner.Training
    r = runner.start(cfg, "rm")
    say("runner.start (tokenizer, weights)")
    spec = r.spec
    ds = runner.build_dataset(r, common.data_config(cfg.data, r.out), "preference")
    shape = None if spec.is_encoder_decoder else pair_shape(ds)
    say(f"dataset ({len(ds.data)} pairs, pair rows {shape})")
    trainable, frozen, t_axes = rm_stage.trainable_params(r, cfg)
    loss_fn = rm_stage.make_loss_fn(spec, cfg, shape=shape)
    # runner.train: optimizer, state, jitted step, loader -> global batches
    optim = cfg.optim
    opt = train.make_optimizer(optim)
    state, shard = train.init_train_state(trainable, opt, r.fold(2), mesh=r.mesh, params_axes=t_axes)
    del trainable
    step = train.jit_train_step(
        train.make_train_step(loss_fn, opt, grad_accum=optim.grad_accum, schedule=train.make_schedule(optim)),
        shard,
        mesh=r.mesh,
        grad_accum=optim.grad_accum,
    )
    dcfg = cfg.data
    loader = data.Loader(
        ds, dcfg.batch_size, seed=dcfg.seed, shuffle=dcfg.shuffle, shuffle_buffer=dcfg.shuffle_buffer
    )
    host = next(iter(loader))
    batch = next(runner.Batches(iter([host]), r.mesh, optim.grad_accum))
    say("train state + batch")
    return step, state, batch, frozen, host, cfg, spec, shape


def stage_step(config_path: str, overrides: list[str], steps: int, warmup: int = 1) -> dict:
    """Time the RM stage's own step (:func:`build_rm_stage_step`) on one loader batch: the first call
    (compile + run) timed alone, ``warmup`` more untimed, then ``steps`` timed calls, each to its loss."""
    t_build = time.perf_counter()
    step, state, batch, frozen, host, cfg, spec, shape = build_rm_stage_step(config_path, overrides)
    t_build = time.perf_counter() - t_build
    t0 = time.perf_counter()
    state, metrics = step(state, batch, frozen)
    first_loss = float(metrics["loss"])
    t_compile = time.perf_counter() - t0
    print(f"[rm-stage-step] first step (compile) {t_compile:.1f} s", file=sys.stderr, flush=True)
    for _ in range(warmup):
        state, metrics = step(state, batch, frozen)
    float(metrics["loss"])
    times, losses = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = step(state, batch, frozen)
        losses.append(float(metrics["loss"]))
        times.append(time.perf_counter() - t0)
    dt = float(np.mean(times))
    c_att, r_att = np.asarray(host["chosen_attention_mask"]), np.asarray(host["rejected_attention_mask"])
    b, t = c_att.shape
    # tokens as TRL's RewardTrainer counts them: prompt + chosen and prompt + rejected (BOS, EOS included)
    seq_tokens = int(c_att.sum() + r_att.sum())
    c_loss = np.asarray(host["chosen_loss_mask"])
    r_loss = np.asarray(host["rejected_loss_mask"])
    resp = np.concatenate([c_loss.sum(1), r_loss.sum(1)])  # response + EOS per sequence
    row_len = shape.length if shape is not None else t
    row_tokens = b * row_len if shape is not None else 2 * b * t  # what the forward pass computes
    cache = jax.config.jax_compilation_cache_dir
    stats = jax.local_devices()[0].memory_stats() or {}
    lcfg = cfg.lora
    from jaxrlhf.models.attention import resolve_attention_impl

    return dict(
        bench="jaxrlhf-rm-stage-step",
        config=config_path,
        overrides=overrides,
        n_params=models.count_params(spec),
        lora=lcfg.rank if lcfg is not None else 0,
        param_dtype=cfg.model.dtype,
        compute_dtype=cfg.model.compute_dtype,
        attention=cfg.model.attention_impl,
        attention_resolved=resolve_attention_impl(cfg.model.attention_impl, cfg.model.compute_dtype),
        remat=cfg.model.remat,
        pairs=b,
        max_length=t,
        pair_rows=[b, row_len] if shape is not None else None,
        pair_shape=list(shape) if shape is not None else None,
        prompt_tokens_mean=float(np.mean(c_att.sum(1) - c_loss.sum(1))),
        response_tokens_mean=float(np.mean(resp)),
        seq_tokens_per_step=seq_tokens,
        row_tokens_per_step=row_tokens,
        tokens_per_s=seq_tokens / dt,
        row_tokens_per_s=row_tokens / dt,
        pairs_per_s=b / dt,
        step_ms=dt * 1e3,
        step_ms_median=float(np.median(times)) * 1e3,
        steps_ms=[round(x * 1e3, 2) for x in times],
        warmup_steps=1 + warmup,
        losses=losses,
        first_loss=first_loss,
        finite=bool(np.all(np.isfinite(losses))),
        compile_s=t_compile,
        build_s=t_build,
        compilation_cache=cache or None,
        peak_gib=stats["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in stats else None,
        devices=len(jax.devices()),
        card=jax.devices()[0].device_kind,
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["full", "lora", "both"], default="both")
    p.add_argument("--tiny", action="store_true", help="tiny model, 2 pairs x 32: a CPU smoke run")
    p.add_argument("--pairs", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--remat", choices=["none", "full", "save_dots"], default="none")
    p.add_argument("--attention", choices=["fused", "plain"], default="fused")
    p.add_argument("--param-dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--stage-config", default=None, help="time the RM stage's own step from this config")
    p.add_argument("--set", action="append", default=[], help="config override key=value (--stage-config)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps after the first (--stage-config)")
    args = p.parse_args(argv)
    if args.stage_config:
        overrides = [*(STAGE_TINY if args.tiny else []), *args.set]
        print(json.dumps(stage_step(args.stage_config, overrides, args.steps, args.warmup)), flush=True)
        return
    args.pairs = args.pairs or (2 if args.tiny else 8)
    args.seq = args.seq or (32 if args.tiny else 1024)
    for mode in ["full", "lora"] if args.mode == "both" else [args.mode]:
        print(json.dumps(run(mode, args)), flush=True)


if __name__ == "__main__":
    main()
