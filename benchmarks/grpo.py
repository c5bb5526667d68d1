"""One GRPO iteration of jaxrlhf, built and run as the GRPO stage builds and runs it (random weights).

The policy, state and update are made the way ``jaxrlhf.stages.grpo.run_group_stage`` makes them (its
defaults: ``GRPOHyperParams()`` = TRL's ``GRPOConfig`` defaults (``beta = 0``: no reference, ``loss_type
dapo``, one update per rollout), the stage's ``optim`` default, ``rl.init_grpo_state``,
``rl.make_grpo_update`` under ``rl.jit_grpo_update``, ``rl.grpo_rollout_models``), and one iteration is what
the stage loop's ``step_fn`` does (``jaxrlhf.stages._rl_loop``): ``rl.rollout.rollout(..., timings=...)``
(generation of ``n`` samples per prompt, then the Python reward on the decoded text and the scoring pass)
then the update, waited for. As the TRL peer (``trl_grpo_llama1b.py``): a word-level tokenizer over the
model's ids (``t0`` ... ``t128255``), random 128-token prompts, the reward = fraction of even token ids of
the completion (a Python function with TRL's signature, given as ``benchmarks/grpo.py:even_fraction``).

Modes: ``full`` (the policy trained in full; ``--dtype float32`` = f32 master weights with bf16 compute,
the stage's ``model.dtype`` default; ``--dtype bfloat16`` = bf16 weights as TRL's ``bf16=True`` model) and
``lora`` (r16 on all linear layers over a bf16 base).

One JSON line: seconds per phase (the stage's ``generation_seconds`` / ``scoring_seconds`` /
``update_seconds``), samples/s, peak memory, the card. Compare with ``trl_grpo_llama1b.py --prompts 16
--generations 4 --new 128`` in the same call (``benchmarks/run_rl_suite.sh``).

  PYTHONPATH=. python3 benchmarks/grpo.py                       # 1.24B, 16 prompts x 4 samples, 128 + 128
  PYTHONPATH=. python3 benchmarks/grpo.py --mode lora
  PYTHONPATH=. python3 benchmarks/grpo.py --tiny                # CPU smoke run (tiny shape)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from sft import ALL_LINEAR, LLAMA_1B, TINY  # benchmarks/sft.py (this directory is on sys.path)

from jaxrlhf import data, models, rl, sharding
from jaxrlhf import lora as lora_lib
from jaxrlhf import train as train_lib
from jaxrlhf.generation import SamplingConfig
from jaxrlhf.models.attention import resolve_attention_impl
from jaxrlhf.rl import prompts as prompts_lib
from jaxrlhf.rl import rollout as rollout_lib
from jaxrlhf.stages import common
from jaxrlhf.stages import grpo as grpo_stage

SPECIAL = dict(bos_token_id=0, eos_token_ids=(1,), pad_token_id=2)  # as the TRL baseline's model


def even_fraction(prompts: list[str], completions: list[str], **columns) -> list[float]:
    """The TRL peer's reward: the fraction of even token ids in the completion (``t<id>`` words)."""
    out = []
    for c in completions:
        ids = [int(w[1:]) for w in c.split() if w.startswith("t") and w[1:].isdigit()]
        out.append(sum(i % 2 == 0 for i in ids) / max(len(ids), 1))
    return out


def word_tokenizer(vocab_size: int, where: str) -> data.Tokenizer:
    """The TRL peer's tokenizer (word level, ``t<id>``; bos t0, eos t1, pad t2, unk t3), saved and loaded."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tm
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(tm.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t3"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="t0", eos_token="t1", pad_token="t2",
                                  unk_token="t3")  # fmt: skip
    tok.save_pretrained(where)
    return data.load_tokenizer(where)


def _stage_default(field: str):
    return grpo_stage.GRPOConfig.__dataclass_fields__[field].default


def build(args) -> dict:
    spec = (TINY if args.tiny else LLAMA_1B).replace(**SPECIAL)
    mesh = sharding.make_mesh(1, -1, 1)  # the stage's default MeshConfig
    dtype = jnp.dtype(args.dtype) if args.mode == "full" else jnp.bfloat16
    compute_dtype = jnp.bfloat16
    impl = resolve_attention_impl("auto", compute_dtype)
    sampling = SamplingConfig(max_new_tokens=args.new, temperature=1.0, n=args.generations)
    hp = dataclasses.replace(
        _stage_default("grpo"), num_generations=args.generations, temperature=1.0, compute_dtype="bfloat16",
        attention_impl=impl, max_completion_length=args.new,
    )  # fmt: skip
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    base = models.init_params(spec, keys[0], dtype, mesh=mesh)
    tok = word_tokenizer(spec.vocab_size, tempfile.mkdtemp())
    rewards = rl.build_rewards(rl.RewardConfig(function=f"{os.path.abspath(__file__)}:even_fraction"), tok)
    lcfg = None
    if args.mode == "lora":
        lcfg = lora_lib.LoraConfig(rank=16, alpha=16, targets=ALL_LINEAR)
        policy = lora_lib.init(spec, base, lcfg, keys[1], dtype=common.ADAPTER_DTYPE)  # as the stage
        frozen = base
    else:
        policy, frozen = base, None  # beta = 0: no reference kept, the state owns the weights
    opt = train_lib.make_optimizer(_stage_default("optim"))
    state, shard = rl.init_grpo_state(spec, policy, optimizer=opt, rng=keys[2], lora_config=lcfg, mesh=mesh)
    del policy, base
    base_sh = None if frozen is None else sharding.named_shardings(models.param_axes(spec), mesh, frozen)
    update = rl.jit_grpo_update(
        rl.make_grpo_update(spec, hp, optimizer=opt, lora_config=lcfg),
        mesh=mesh, state_shardings=shard, base_shardings=base_sh,
    )  # fmt: skip
    r = np.random.default_rng(1)
    ids = r.integers(4, min(32000, spec.vocab_size), (args.prompts, args.prompt_len)).astype(np.int32)
    texts = [" ".join(f"t{i}" for i in row) for row in ids]
    batch = prompts_lib.PromptBatch(
        prompts_lib.to_global(ids, mesh), prompts_lib.to_global(np.ones_like(ids), mesh),
        texts, [None] * args.prompts, {}, np.arange(args.prompts),
    )  # fmt: skip
    return dict(spec=spec, mesh=mesh, sampling=sampling, compute_dtype=compute_dtype, impl=impl, lcfg=lcfg,
                frozen=frozen, rewards=rewards, state=state, update=update, batch=batch)  # fmt: skip


def iteration(b: dict, state, it: int):
    """The stage loop's ``step_fn``: rollout (with the stage's timings) -> update, waited for."""
    key = jax.random.fold_in(jax.random.PRNGKey(7), it)
    timings: dict = {}
    t0 = time.perf_counter()
    models_ = rl.grpo_rollout_models(b["spec"], state, b["frozen"], lora_config=b["lcfg"], no_ref=True)
    ro = rollout_lib.rollout(
        models_, b["rewards"], b["batch"], jax.random.fold_in(key, 0), b["sampling"],
        compute_dtype=b["compute_dtype"], attention_impl=b["impl"], mesh=b["mesh"], timings=timings,
    )  # fmt: skip
    t1 = time.perf_counter()
    state, m = b["update"](state, b["frozen"], ro, jax.random.fold_in(key, 1))
    jax.block_until_ready(state.step)
    t2 = time.perf_counter()
    timings.update(update_seconds=t2 - t1, iteration_seconds=t2 - t0)
    return state, m, timings


def run(args) -> dict:
    b = build(args)
    state = b["state"]
    t0 = time.perf_counter()
    state, m, _ = iteration(b, state, 0)  # compiles generation, scoring and the update
    first = {k: float(m[k]) for k in ("ratio_first", "reward_mean")}
    t_compile = time.perf_counter() - t0
    runs = []
    for it in range(1, args.iterations + 1):
        state, m, timings = iteration(b, state, it)
        runs.append(timings)
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    rows = args.prompts * args.generations
    stats = jax.devices()[0].memory_stats() or {}
    return dict(
        bench="jaxrlhf-grpo-iteration",
        shape="tiny" if args.tiny else "llama1b",
        mode=args.mode,
        dtype=str(jnp.dtype(args.dtype)) if args.mode == "full" else "bfloat16",
        n_params=models.count_params(b["spec"]),
        lora=16 if b["lcfg"] is not None else 0,
        prompts=args.prompts,
        generations=args.generations,
        prompt_len=args.prompt_len,
        new=args.new,
        attention=b["impl"],
        iteration_s=med["iteration_seconds"],
        samples_per_s=rows / med["iteration_seconds"],
        generation_s=med["generation_seconds"],
        scoring_s=med["scoring_seconds"],
        update_s=med["update_seconds"],
        generation_fraction=med["generation_seconds"] / med["iteration_seconds"],
        iterations=[round(r["iteration_seconds"], 4) for r in runs],
        completion_length=float(m["completion_length"]),
        peak_gib=stats.get("peak_bytes_in_use", 0) / 2**30,
        first_iteration_s=t_compile,
        **first,
        devices=len(jax.devices()),
        card=jax.devices()[0].device_kind,
    )


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["full", "lora"], default="full")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="full mode: parameter dtype (compute is bf16 either way)")  # fmt: skip
    p.add_argument(
        "--tiny", action="store_true", help="tiny model, 4 prompts x 4 x (16 + 16): a CPU smoke run"
    )
    p.add_argument("--prompts", type=int, default=None)
    p.add_argument("--generations", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=None)
    p.add_argument("--new", type=int, default=None)
    p.add_argument("--iterations", type=int, default=3, help="timed iterations after the first (median)")
    args = p.parse_args()
    args.prompts = args.prompts or (4 if args.tiny else 16)
    args.prompt_len = args.prompt_len or (16 if args.tiny else 128)
    args.new = args.new or (16 if args.tiny else 128)
    print(json.dumps(run(args)), flush=True)


if __name__ == "__main__":
    main()
