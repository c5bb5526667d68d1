"""Time a stage's own jitted train step: its config, its loader's packed batch, its ``make_loss_fn``, and the
``train.make_train_step`` / ``jit_train_step`` construction of ``stages.runner.train`` (no special path).

``data.path: bench`` writes prompt / completion pairs of words from the tiny corpus (about 200-700 tokens of
the tiny tokenizer each, half prompt, half completion) so the packed rows hold several examples with reset
positions and a loss on the completions, as a real SFT set does.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import jax
import numpy as np

from jaxrlhf import data, models, train
from jaxrlhf import lora as lora_lib
from jaxrlhf.config import load_config
from jaxrlhf.stages import common, runner, sft


def write_bench_data(path: str, n: int = 3000, seed: int = 0) -> str:
    import jaxrlhf

    corpus = os.path.join(os.path.dirname(jaxrlhf.__file__), "assets", "tiny", "corpus.txt")
    words = open(corpus).read().split()
    r = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(n):
            k = int(r.integers(45, 160))  # words per half; the tiny BPE gives ~2.2 tokens per word
            text = [words[i] for i in r.integers(0, len(words), 2 * k)]
            f.write(json.dumps({"prompt": " ".join(text[:k]), "completion": " ".join(text[k:])}) + "\n")
    return path


def build_stage_step(config_path: str, overrides: list[str]):
    """``(jitted step, state, device batch, frozen, host batch, config, spec, max_segments)`` of the SFT
    stage's own step."""
    work = tempfile.mkdtemp(prefix="jaxrlhf-bench-")
    raw = load_config(sft.SFTConfig, config_path, overrides)
    extra = [f"output_dir={work}/run", f"tokenizer.cache_dir={work}/tok", f"data.cache_dir={work}/data"]
    if raw.data.path == "bench":
        extra.append(f"data.path={write_bench_data(os.path.join(work, 'bench.jsonl'))}")
    cfg = load_config(sft.SFTConfig, config_path, [*overrides, *extra])
    t0 = time.perf_counter()

    def say(what):  # where the build time goes (80 s on the GPU machine, 7 s on a CPU with a tiny model)
        print(f"[stage-step] {what} at {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)

    r = runner.start(cfg, "sft")
    say("runner.start (tokenizer, weights)")
    spec, lcfg = r.spec, cfg.lora
    ds = runner.build_dataset(r, common.data_config(cfg.data, r.out), "sft")
    say("dataset")
    axes = models.param_axes(spec)
    frozen = None
    if lcfg is not None:
        trainable = lora_lib.init(spec, r.params, lcfg, r.fold(1), dtype=common.ADAPTER_DTYPE)
        trainable_axes, frozen = lora_lib.param_axes(axes, trainable), r.params
    else:
        trainable, trainable_axes = r.params, axes
    r.params = None
    loss_fn = sft.make_loss_fn(spec, cfg, lcfg, sft.segment_bound(cfg, ds))
    opt = train.make_optimizer(cfg.optim)
    state, shard = train.init_train_state(trainable, opt, r.fold(2), mesh=r.mesh, params_axes=trainable_axes)
    del trainable
    k = cfg.optim.grad_accum
    step = train.jit_train_step(
        train.make_train_step(loss_fn, opt, grad_accum=k, schedule=train.make_schedule(cfg.optim)),
        shard,
        mesh=r.mesh,
        grad_accum=k,
    )
    loader = data.Loader(ds, cfg.data.batch_size, seed=cfg.data.seed, shuffle=cfg.data.shuffle)
    host = next(iter(loader))
    batch = next(runner.Batches(iter([host]), r.mesh, k))
    say("train state + batch")
    return step, state, batch, frozen, host, cfg, spec, sft.segment_bound(cfg, ds)


def stage_step(config_path: str, overrides: list[str], steps: int) -> dict:
    t_build = time.perf_counter()
    step, state, batch, frozen, host, cfg, spec, bound = build_stage_step(config_path, overrides)
    t_build = time.perf_counter() - t_build
    print(f"[stage-step] built in {t_build:.1f} s (max_segments {bound})", file=sys.stderr, flush=True)
    lcfg = cfg.lora
    seg = np.asarray(host["segment_ids"])
    t0 = time.perf_counter()
    for _ in range(2):
        state, metrics = step(state, batch, frozen)
    float(metrics["loss"])
    t_compile = time.perf_counter() - t0
    print(f"[stage-step] compile + 2 steps {t_compile:.1f} s", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch, frozen)
    loss = float(metrics["loss"])
    dt = (time.perf_counter() - t0) / steps
    b, t = seg.shape
    tokens = b * t / dt
    n_params = models.count_params(spec)
    fpt = train.flops_per_token(n_params, spec.num_layers, t, spec.hidden_size)
    stats = jax.devices()[0].memory_stats() or {}
    return dict(
        bench="jaxrlhf-sft-stage-step",
        config=config_path,
        overrides=overrides,
        lora=lcfg.rank if lcfg is not None else 0,
        batch=b,
        seq=t,
        attention=cfg.model.attention_impl,
        remat=cfg.model.remat,
        max_segments=bound,
        examples_per_row=float(np.mean([len(set(row[row > 0].tolist())) for row in seg])),
        real_token_fraction=float(np.mean(seg > 0)),
        loss_token_fraction=float(np.mean(np.asarray(host["loss_mask"]))),
        tokens_per_s=tokens,
        step_ms=dt * 1e3,
        mfu_vs_989=fpt * tokens / 989e12,
        peak_gib=stats.get("peak_bytes_in_use", 0) / 2**30,
        loss=loss,
        compile_s=t_compile,
        build_s=t_build,
        card=jax.devices()[0].device_kind,
    )
