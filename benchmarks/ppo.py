"""One PPO iteration of jaxrlhf, built and run as the PPO stage builds and runs it (random weights).

The actors, state and update are made the way ``jaxrlhf.stages.ppo.run`` makes them (its defaults:
``PPOHyperParams()``, the stage's optimizer configs, ``rl.init_ppo_state``, ``rl.make_ppo_update`` under
``rl.jit_ppo_update``, ``rl.rollout_models``), and one iteration is what the stage loop's ``step_fn`` does
(``jaxrlhf.stages._rl_loop``): ``rl.rollout.rollout(..., timings=...)`` then the update, waited for. Only the
weights are random and the prompts are random token ids (no tokenizer, no Python reward). Modes:

- ``full``: four models, as with an SFT policy and a full RM stage checkpoint: policy (trained), reference
  (the frozen starting weights), critic (trained, initialised from the reward model: ``critic.init=auto``),
  reward model; f32 master weights (``model.dtype`` default), bf16 compute.
- ``lora``: one bf16 base (``model.dtype=bfloat16``); policy, critic (``critic.init=policy`` +
  ``critic.lora``) and reward model as three LoRA r16 adapter sets on it (all linear layers), the
  reference = the base with the policy adapters left out.

One JSON line per run: seconds per phase inside the iteration (generation, scoring, update: the stage's own
``generation_seconds`` / ``scoring_seconds`` / ``update_seconds``), each phase timed alone too (generation:
``generation.generate`` with the rollout's arguments; scoring: the rollout fed the same generated tokens;
update: the jitted update on the same rollout), the iteration / sum-of-phases-alone ratio, samples/s,
device ``peak_bytes_in_use`` and the card. Compare with ``trl_grpo_llama1b.py --prompts 16 --generations 4
--new 128`` (64 samples per step) run in the same call (``benchmarks/run_rl_suite.sh``).

  PYTHONPATH=. python3 benchmarks/ppo.py --mode full              # 1.24B Llama-3.2-1B shape, 64 x 128 + 128
  PYTHONPATH=. python3 benchmarks/ppo.py --mode lora
  PYTHONPATH=. python3 benchmarks/ppo.py --shape llama3-8b --mode lora
  PYTHONPATH=. python3 benchmarks/ppo.py --mode full --tiny       # CPU smoke run (tiny shape, 8 x 16 + 16)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
from sft import ALL_LINEAR, LLAMA_1B, TINY  # benchmarks/sft.py (this directory is on sys.path)

from jaxrlhf import generation, models, rl, sharding
from jaxrlhf import lora as lora_lib
from jaxrlhf import train as train_lib
from jaxrlhf.generation import SamplingConfig
from jaxrlhf.models import heads
from jaxrlhf.models.attention import resolve_attention_impl
from jaxrlhf.rl import prompts as prompts_lib
from jaxrlhf.rl import rollout as rollout_lib
from jaxrlhf.stages import common
from jaxrlhf.stages import ppo as ppo_stage

SPECIAL = dict(bos_token_id=0, eos_token_ids=(1,), pad_token_id=2)  # as the TRL baseline's model
SHAPES = {
    "llama1b": LLAMA_1B.replace(**SPECIAL),
    "llama3-8b": LLAMA_1B.replace(
        hidden_size=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        intermediate_size=14336,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
        **SPECIAL,
    ),  # fmt: skip
    "tiny": TINY.replace(**SPECIAL),
}


def _stage_default(field: str):
    return ppo_stage.PPOConfig.__dataclass_fields__[field].default


def build(args) -> dict:
    """Everything ``stages.ppo.run`` builds before its loop, for ``args.mode`` (module docstring)."""
    spec = SHAPES["tiny" if args.tiny else args.shape]
    mesh = sharding.make_mesh(1, -1, 1)  # the stage's default MeshConfig
    dtype = jnp.float32 if args.mode == "full" else jnp.bfloat16
    compute_dtype = jnp.bfloat16
    impl = resolve_attention_impl("auto", compute_dtype)
    sampling = SamplingConfig(max_new_tokens=args.new, temperature=1.0)
    hp = dataclasses.replace(
        _stage_default("ppo"), epochs=args.epochs, num_minibatches=args.minibatches,
        grad_accum=args.grad_accum, temperature=1.0, compute_dtype="bfloat16", attention_impl=impl,
    )  # fmt: skip
    keys = jax.random.split(jax.random.PRNGKey(0), 8)
    rep = sharding.replicated(mesh)
    base = models.init_params(spec, keys[0], dtype, mesh=mesh)
    lcfg = None
    if args.mode == "full":
        rm_params = models.init_params(spec, keys[1], dtype, mesh=mesh)
        rm_head = jax.device_put(heads.init_head(spec, keys[2], dtype=dtype), rep)
        scorer = rl.Scorer(spec, rm_params, rm_head)
        policy, ref = ppo_stage._copy(base), rl.Actor(spec, base)
        c_backbone, c_lcfg = rm_params, None  # critic.init=auto -> the reward model's backbone and head
        critic = {"backbone": ppo_stage._copy(rm_params), "head": ppo_stage._copy(rm_head)}
    else:
        lcfg = lora_lib.LoraConfig(rank=16, alpha=16, targets=ALL_LINEAR)
        c_lcfg = lcfg
        ad = common.ADAPTER_DTYPE  # f32 adapters and heads on the bf16 base, as the RM / PPO stages have
        rm_ad = lora_lib.init(spec, base, lcfg, keys[1], dtype=ad)
        rm_head = jax.device_put(heads.init_head(spec, keys[2], dtype=ad), rep)
        scorer = rl.Scorer(spec, base, rm_head, rm_ad, lcfg)  # a LoRA RM on the policy's base shares it
        policy, ref = lora_lib.init(spec, base, lcfg, keys[3], dtype=ad), None
        c_backbone = base  # critic.init=policy + critic.lora: an adapter set on the same base
        critic = {
            "backbone": lora_lib.init(spec, base, c_lcfg, keys[4], dtype=ad),
            "head": jax.device_put(heads.init_head(spec, keys[5], dtype=ad), rep),
        }
    rewards = rl.build_rewards(rl.RewardConfig(), None, mesh=mesh, scorer=scorer, stats=(0.0, 1.0))
    frozen = rl.PPOFrozen(base if lcfg is not None else None, c_backbone if c_lcfg is not None else None)
    pm = rl.PPOModels(spec, spec, policy_lora=lcfg, critic_lora=c_lcfg)
    opt_p = train_lib.make_optimizer(_stage_default("optim"))
    opt_c = train_lib.make_optimizer(_stage_default("critic_optim"))
    state, shard = rl.init_ppo_state(
        pm, hp, policy, critic, policy_optimizer=opt_p, critic_optimizer=opt_c, rng=keys[6],
        reward_stats={"mean": 0.0, "std": 1.0}, reward_stats_count=100.0, mesh=mesh,
    )  # fmt: skip
    del policy, critic
    update = rl.jit_ppo_update(
        rl.make_ppo_update(pm, hp, policy_optimizer=opt_p, critic_optimizer=opt_c),
        mesh=mesh, state_shardings=shard, frozen_shardings=rl.frozen_shardings(pm, frozen, mesh),
    )  # fmt: skip
    r = np.random.default_rng(1)
    ids = r.integers(4, min(32000, spec.vocab_size), (args.prompts, args.prompt_len)).astype(np.int32)
    batch = prompts_lib.PromptBatch(
        prompts_lib.to_global(ids, mesh), prompts_lib.to_global(np.ones_like(ids), mesh),
        [""] * args.prompts, [None] * args.prompts, {}, np.arange(args.prompts),
    )  # fmt: skip
    held = rollout_lib.parameter_bytes((base, ref, c_backbone, rewards.scorer))
    return dict(spec=spec, mesh=mesh, sampling=sampling, compute_dtype=compute_dtype, impl=impl, pm=pm,
                frozen=frozen, ref=ref, rewards=rewards, state=state, update=update, batch=batch, held=held,
                lcfg=lcfg)  # fmt: skip


def iteration(b: dict, state, it: int):
    """The stage loop's ``step_fn``: rollout (with the stage's timings) -> update, waited for."""
    key = jax.random.fold_in(jax.random.PRNGKey(7), it)
    timings: dict = {}
    t0 = time.perf_counter()
    ro = rollout_lib.rollout(
        rl.rollout_models(b["pm"], state, b["frozen"], ref=b["ref"]), b["rewards"], b["batch"],
        jax.random.fold_in(key, 0), b["sampling"], rm_stats=rl.rm_stats(state),
        compute_dtype=b["compute_dtype"], attention_impl=b["impl"], mesh=b["mesh"], timings=timings,
    )  # fmt: skip
    t1 = time.perf_counter()
    state, m = b["update"](state, b["frozen"], ro, jax.random.fold_in(key, 1), None)
    jax.block_until_ready(state.step)
    t2 = time.perf_counter()
    timings.update(update_seconds=t2 - t1, iteration_seconds=t2 - t0)
    return state, ro, m, timings


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _progress(t_start: float, what: str) -> None:
    """A timestamped progress line on stderr (a part cut off by its cap still shows how far it got)."""
    print(f"[ppo.py {time.perf_counter() - t_start:7.1f}s] {what}", file=sys.stderr, flush=True)


def _summary(args, b: dict, runs: list[dict]) -> dict:
    """The iteration's numbers (printed as soon as the timed iterations are done, before the phases alone)."""
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    stats = jax.devices()[0].memory_stats() or {}
    return dict(
        bench="jaxrlhf-ppo-iteration",
        shape="tiny" if args.tiny else args.shape,
        mode=args.mode,
        n_params=models.count_params(b["spec"]),
        lora=16 if b["lcfg"] is not None else 0,
        prompts=args.prompts,
        prompt_len=args.prompt_len,
        new=args.new,
        epochs=args.epochs,
        minibatches=args.minibatches,
        grad_accum=args.grad_accum,
        attention=b["impl"],
        iteration_s=med["iteration_seconds"],
        samples_per_s=args.prompts / med["iteration_seconds"],  # sampling.n = 1: one sample per prompt
        generation_s=med["generation_seconds"],
        scoring_s=med["scoring_seconds"],
        update_s=med["update_seconds"],
        generation_fraction=med["generation_seconds"] / med["iteration_seconds"],
        iterations=[round(r["iteration_seconds"], 4) for r in runs],
        peak_gib=stats.get("peak_bytes_in_use", 0) / 2**30,
        frozen_params_gib=b["held"] / 2**30,
        devices=len(jax.devices()),
        card=jax.devices()[0].device_kind,
    )


def run(args) -> dict:
    t_start = time.perf_counter()
    b = build(args)
    state = b["state"]
    jax.block_until_ready(state)
    t_build = time.perf_counter() - t_start
    _progress(t_start, "built the actors and the state")
    t0 = time.perf_counter()
    state, ro, m, _ = iteration(b, state, 0)  # compiles generation, scoring and the update
    first = {k: float(m[k]) for k in ("ratio_first", "approx_kl_first")}  # 1 and 0: ratio of a fresh rollout
    t_compile = time.perf_counter() - t0
    _progress(t_start, f"first iteration (compiles) {t_compile:.1f}s")
    runs = []
    for it in range(1, args.iterations + 1):
        state, ro, m, timings = iteration(b, state, it)
        runs.append(timings)
        _progress(t_start, f"iteration {it}: {timings['iteration_seconds']:.3f}s")
    partial = dict(_summary(args, b, runs), build_s=t_build, first_iteration_s=t_compile, **first)
    if args.no_alone:
        return partial
    print(json.dumps(dict(partial, partial=True)), flush=True)  # in case the phases alone hit the cap

    # each phase alone, on the same inputs
    pol = rl.rollout_models(b["pm"], state, b["frozen"], ref=b["ref"]).policy
    gen_args = (pol.spec, pol.params, b["batch"].prompt_ids, b["batch"].prompt_mask, jax.random.PRNGKey(3))
    gen_kw = dict(lora=pol.lora, lora_config=pol.lora_config, compute_dtype=b["compute_dtype"],
                  attention_impl=b["impl"], mesh=b["mesh"])  # fmt: skip
    gen_alone = _median_time(
        lambda: generation.generate(*gen_args, b["sampling"], **gen_kw).tokens, args.repeats
    )
    gen = generation.generate(*gen_args, b["sampling"], **gen_kw)
    real = rollout_lib.generation
    rollout_lib.generation = types.SimpleNamespace(generate=lambda *a, **k: jax.block_until_ready(gen))
    try:  # the rollout given these tokens: its scoring_seconds is the scoring pass alone
        score_times = []
        for i in range(args.repeats):
            timings: dict = {}
            rollout_lib.rollout(
                rl.rollout_models(b["pm"], state, b["frozen"], ref=b["ref"]), b["rewards"], b["batch"],
                jax.random.PRNGKey(i), b["sampling"], rm_stats=rl.rm_stats(state),
                compute_dtype=b["compute_dtype"], attention_impl=b["impl"], mesh=b["mesh"], timings=timings,
            )  # fmt: skip
            score_times.append(timings["scoring_seconds"])
    finally:
        rollout_lib.generation = real
    score_alone = statistics.median(score_times)
    upd = []
    for i in range(args.repeats):
        t = time.perf_counter()
        state, _ = b["update"](state, b["frozen"], ro, jax.random.PRNGKey(100 + i), None)
        jax.block_until_ready(state.step)
        upd.append(time.perf_counter() - t)
    update_alone = statistics.median(upd)
    alone = gen_alone + score_alone + update_alone
    return dict(
        partial,
        generation_alone_s=gen_alone,
        scoring_alone_s=score_alone,
        update_alone_s=update_alone,
        sum_alone_s=alone,
        iteration_over_sum_alone=partial["iteration_s"] / alone,
        generated_tokens_per_s=args.prompts * args.new / gen_alone,
        peak_gib=(jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use", 0) / 2**30,
    )


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["full", "lora"], default="full")
    p.add_argument("--shape", choices=["llama1b", "llama3-8b"], default="llama1b")
    p.add_argument("--tiny", action="store_true", help="tiny model, 8 prompts x 16 + 16 new: a CPU smoke run")
    p.add_argument("--prompts", type=int, default=None)
    p.add_argument("--prompt-len", type=int, default=None)
    p.add_argument("--new", type=int, default=None)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--minibatches", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--iterations", type=int, default=3, help="timed iterations after the first (median)")
    p.add_argument("--repeats", type=int, default=3, help="timings of each phase alone (median)")
    p.add_argument("--no-alone", action="store_true", help="skip timing each phase alone (big shapes)")
    args = p.parse_args()
    args.prompts = args.prompts or (8 if args.tiny else 64)
    args.prompt_len = args.prompt_len or (16 if args.tiny else 128)
    args.new = args.new or (16 if args.tiny else 128)
    print(json.dumps(run(args)), flush=True)


if __name__ == "__main__":
    main()
