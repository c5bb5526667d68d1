"""Where the device time goes: trace a decode loop or a training step and print the kernels that take it.

    PYTHONPATH=. python3 benchmarks/profile_step.py decode --batch 1     # GPU: 1.24B bf16, 64 decode steps
    PYTHONPATH=. python3 benchmarks/profile_step.py sft             # GPU: one full-FT step, 8 x 2048
    PYTHONPATH=. python3 benchmarks/profile_step.py sft --stage-config benchmarks/configs/sft_llama1b.yaml
    PYTHONPATH=. python3 benchmarks/profile_step.py sample --batch 64 --sampling topp --new 64  # the sampler
    PYTHONPATH=. python3 benchmarks/profile_step.py decode --tiny        # CPU smoke run

Prints one JSON line: the wall time of the traced region, the summed kernel time on the device, the number
of kernels (per decode step for ``decode``), and the top kernels by total time with their counts. The trace is
``jax.profiler.trace(..., create_perfetto_trace=True)``; the events on device streams are summed by name.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time

import jax
import jax.numpy as jnp


def device_events(log_dir: str) -> list[dict]:
    """Complete ("X") events of the device (GPU / TPU) processes of the perfetto trace under ``log_dir``."""
    paths = glob.glob(os.path.join(log_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    if not paths:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {log_dir}")
    with gzip.open(sorted(paths)[-1], "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    names = {
        e["pid"]: e.get("args", {}).get("name", "")
        for e in events
        if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    threads = {
        (e["pid"], e.get("tid")): e.get("args", {}).get("name", "")
        for e in events
        if e.get("ph") == "M" and e.get("name") == "thread_name"
    }
    dev = {pid for pid, n in names.items() if "/device:" in n and "CPU" not in n.upper()}
    if not dev:  # CPU backend: the XLA ops run on host threads
        dev = {pid for pid, n in names.items() if "/host:CPU" in n or "XLA" in n}
    out = [e for e in events if e.get("ph") == "X" and e.get("pid") in dev and "dur" in e]
    # a GPU trace shows each kernel on its stream and again as an XLA op line: keep the streams
    streams = {k for k, n in threads.items() if k[0] in dev and n.startswith("Stream")}
    if streams:
        out = [e for e in out if (e["pid"], e.get("tid")) in streams]
    for e in out:
        e["thread"] = threads.get((e["pid"], e.get("tid")), "")
    return out


def summarize(events: list[dict], top: int) -> dict:
    by_name: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    for e in events:
        s = by_name[e["name"]]
        s[0] += 1
        s[1] += float(e["dur"])
    total = sum(v[1] for v in by_name.values())
    rows = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]
    per_thread: dict[str, int] = collections.Counter(e.get("thread", "") for e in events)
    groups: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    for name, (c, t) in by_name.items():  # "loop_add_fusion_12" -> "loop_add_fusion"; kernels by kind
        g = groups[re.sub(r"[._]?\d+$", "", name.split("(")[0])[:60]]
        g[0] += c
        g[1] += t
    return dict(
        threads=dict(per_thread.most_common(6)),
        kernel_us=total,
        kernels=sum(v[0] for v in by_name.values()),
        top=[
            dict(name=k[:90], count=c, us=round(t, 1), share=round(t / max(total, 1e-9), 4))
            for k, (c, t) in rows
        ],
        kinds=[
            dict(kind=k, count=c, us=round(t, 1))
            for k, (c, t) in sorted(groups.items(), key=lambda kv: -kv[1][1])[:top]
        ],
        all_kernels={k: [c, round(t, 1)] for k, (c, t) in by_name.items()},
    )


def traced(fn, top: int) -> dict:
    jax.block_until_ready(fn())  # compile + warm-up outside the trace
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            t = time.perf_counter()
            jax.block_until_ready(fn())
            wall = time.perf_counter() - t
        out = summarize(device_events(d), top)
    out["wall_us"] = wall * 1e6
    return out


def profile_decode(args) -> dict:
    from benchmarks.generate import LLAMA_1B, TINY
    from jaxrlhf import generation, models
    from jaxrlhf.models.spec import ModelSpec

    spec = ModelSpec(**(TINY if args.tiny else LLAMA_1B))
    dtype = jnp.bfloat16
    params = models.init_params(spec, jax.random.key(0), dtype=dtype)
    ids = jax.random.randint(jax.random.key(1), (args.batch, args.prompt), 0, spec.vocab_size, jnp.int32)
    cfg = generation.SamplingConfig(
        max_new_tokens=args.new, min_new_tokens=args.new, temperature=0.0, stop_token_ids=()
    )
    if not args.pad_single_row:
        generation._MIN_DECODE_ROWS.clear()
    m, rcfg, pids, pmask, _ = generation._setup(
        spec, ids, jnp.ones_like(ids), cfg, None, None, dtype, dtype, args.attention, None, bool(args.fuse)
    )

    def run(steps):
        return generation._generate_jit(
            m, rcfg, params, pids, pmask, jax.random.key(2), jnp.int32(steps), None
        )

    one = traced(lambda: run(1), args.top)
    full = traced(lambda: run(args.new), args.top)
    steps = args.new - 1
    full.update(
        bench="profile-decode",
        batch=args.batch,
        fuse=args.fuse,
        decode_steps=steps,
        kernels_per_step=(full["kernels"] - one["kernels"]) / steps,
        kernel_us_per_step=(full["kernel_us"] - one["kernel_us"]) / steps,
        wall_us_per_step=(full["wall_us"] - one["wall_us"]) / steps,
        xla_flags=os.environ.get("XLA_FLAGS", ""),
        card=jax.devices()[0].device_kind,
    )
    return full


def profile_sft(args) -> dict:
    if args.stage_config:  # the SFT stage's own step (benchmarks/_stage.py)
        from benchmarks._stage import build_stage_step

        step, state, batch, frozen, *_ = build_stage_step(args.stage_config, args.set)
        holder = {"state": state}

        def stage_one():
            holder["state"], metrics = step(holder["state"], batch, frozen)
            return metrics["loss"]

        out = traced(stage_one, args.top)
        out.update(bench="profile-sft-stage", config=args.stage_config, overrides=args.set)
        out.update(xla_flags=os.environ.get("XLA_FLAGS", ""), card=jax.devices()[0].device_kind)
        return out
    import benchmarks.sft as sft_bench

    ns = argparse.Namespace(
        tiny=args.tiny, batch=2 if args.tiny else 8, seq=32 if args.tiny else 2048, steps=1, grad_accum=1,
        lora_rank=16, remat="none", attention="fused", param_dtype="float32",
    )  # fmt: skip
    step, state, ids, frozen = sft_bench.build("full", ns)
    holder = {"state": state}

    def one():
        holder["state"], metrics = step(holder["state"], ids, frozen)
        return metrics["loss"]

    out = traced(one, args.top)
    out.update(
        bench="profile-sft", xla_flags=os.environ.get("XLA_FLAGS", ""), card=jax.devices()[0].device_kind
    )
    return out


def profile_sample(args) -> dict:
    """The sampler alone (``benchmarks/sampling_micro.py``'s fori loop of ``sample``) at [batch, vocab]:
    kernels and device time per step for ``--sampling`` (greedy / temp1 / topp / topk) and ``--method``."""
    from benchmarks.sampling_micro import CONFIGS, looped

    batch, vocab = (4, 512) if args.tiny else (args.batch, args.vocab)
    z = jax.random.normal(jax.random.key(0), (batch, vocab), jnp.float32) * 0.5
    f = looped(CONFIGS[args.sampling], None if args.method == "default" else args.method)
    rng = jax.random.key(1)
    one = traced(lambda: f(z, rng, 1), args.top)
    full = traced(lambda: f(z, rng, args.new), args.top)
    steps = args.new - 1
    full.update(
        bench="profile-sample",
        sampling=args.sampling,
        method=args.method,
        batch=batch,
        vocab=vocab,
        kernels_per_step=(full["kernels"] - one["kernels"]) / steps,
        kernel_us_per_step=(full["kernel_us"] - one["kernel_us"]) / steps,
        wall_us_per_step=(full["wall_us"] - one["wall_us"]) / steps,
        card=jax.devices()[0].device_kind,
    )
    return full


_HLO_LINE = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*)$")


def hlo_where(dump_dir: str, names: list[str]) -> dict[str, str]:
    """kernel name -> ``shape ... op_name | source_file:line`` of the instruction of that name in the
    optimized HLO XLA dumped (``--hlo``): fusions and custom calls are named after their instruction."""
    want, out = set(names), {}
    for path in glob.glob(os.path.join(dump_dir, "*after_optimizations.txt")):
        with open(path) as f:
            for line in f:
                m = _HLO_LINE.match(line)
                name = m.group(1).replace(".", "_") if m else ""  # the trace writes loop_fusion.3 as _3
                if not m or name not in want or name in out:
                    continue
                rest = m.group(2)
                op = re.search(r'op_name="([^"]+)"', rest)
                src = re.search(r'source_file="([^"]+)" source_line=(\d+)', rest)
                where = (op.group(1)[-120:] if op else "?") + (
                    f" | {os.path.basename(src.group(1))}:{src.group(2)}" if src else ""
                )
                out[name] = rest.split(", metadata=")[0][:160] + " :: " + where
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["decode", "sft", "sample"])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--attention", default="plain", help="decode: attention_impl (plain / fused / auto)")
    p.add_argument("--fuse", type=int, default=1, help="decode: fuse q/k/v and gate/up projections (1/0)")
    p.add_argument("--pad-single-row", type=int, default=1, help="decode: batch 1 as two rows on GPU (1/0)")
    p.add_argument("--stage-config", default=None, help="sft: the SFT stage's own step (a config)")
    p.add_argument("--set", action="append", default=[], help="sft --stage-config: override key=value")
    p.add_argument("--sampling", default="topp", help="sample: greedy, temp1, topp (0.9) or topk (50)")
    p.add_argument("--method", default="default", help="sample: a _sampling.METHODS name or 'default'")
    p.add_argument("--vocab", type=int, default=128256, help="sample: vocabulary size")
    p.add_argument("--dump", default=None, help="also write the result JSON with every kernel to FILE.json")
    p.add_argument(
        "--hlo", action="store_true", help="name each top kernel's HLO instruction and source line"
    )
    args = p.parse_args()
    hlo_dir = None
    if args.hlo:  # read when the backend starts (below), so setting it here still counts
        hlo_dir = tempfile.mkdtemp(prefix="jaxrlhf-prof-hlo-")
        os.environ["JAXRLHF_COMPILATION_CACHE"] = "off"  # a cached executable would skip the dump
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={hlo_dir} --xla_dump_hlo_as_text"
        ).strip()
    if args.tiny:
        args.prompt, args.new = 16, 16
    out = {"decode": profile_decode, "sft": profile_sft, "sample": profile_sample}[args.what](args)
    if hlo_dir:
        names = [
            k for k, _ in sorted(out["all_kernels"].items(), key=lambda kv: -kv[1][1])[: max(args.top, 60)]
        ]
        where = hlo_where(hlo_dir, names)
        out["hlo"] = {n: where[n] for n in names if n in where}
    if args.dump:
        with open(args.dump + ".json", "w") as f:
            json.dump(out, f)
        if hlo_dir:  # the largest optimized module (the step / the loop), gzipped beside the JSON
            dumps = glob.glob(os.path.join(hlo_dir, "*after_optimizations.txt"))
            # the parameter initialisers compile to large modules too: never pick one of those
            dumps = [d for d in dumps if "init" not in os.path.basename(d).lower()] or dumps
            if dumps:
                biggest = max(dumps, key=os.path.getsize)
                with open(biggest, "rb") as f, gzip.open(args.dump + ".hlo.gz", "wb") as g:
                    g.write(f.read())
    out.pop("all_kernels")
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
