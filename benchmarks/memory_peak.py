"""What is live at a stage step's memory peak: XLA's own buffer live ranges, grouped by the source line.

    PYTHONPATH=. python3 benchmarks/memory_peak.py --stage-config benchmarks/configs/sft_llama1b_lora.yaml
    PYTHONPATH=. python3 benchmarks/memory_peak.py --stage-config ... --set model.remat=save_dots --top 40

Builds the SFT stage's own jitted step (``benchmarks/_stage.py``), compiles it with XLA's dump on
(``--xla_dump_to``: the compiler writes ``*-live-range.txt``: every buffer live at the program point of
the peak, with its size) and prints one JSON line: the device's measured peak after one step, the peak as
XLA's heap simulation counts it (arguments included), and the buffers live at that peak grouped by the HLO
instruction's ``source_file:line`` (from the optimized module's metadata) and by shape, largest first.
Nothing is timed.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import sys
import tempfile

DUMP = tempfile.mkdtemp(prefix="jaxrlhf-xla-dump-")
os.environ["JAXRLHF_COMPILATION_CACHE"] = "off"  # a cached executable would skip the compile and its dump
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={DUMP} --xla_dump_hlo_as_text"
    " --xla_dump_hlo_module_re=.*step.*"
).strip()

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402

_PEAK = re.compile(r"^\s*Live ranges at (\d+) \(peak\):")
_LIVE = re.compile(r"^\s+(\S+?)(\{[^}]*\})?: (\d+) bytes")
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\([^=]*?\)|[a-z0-9]+\[[^\]]*\])")
_SRC = re.compile(r'source_file="([^"]+)" source_line=(\d+)')
_OP = re.compile(r'op_name="([^"]+)"')


def parse_peak(live_range_text: str) -> list[tuple[str, int]]:
    """``[(value name, bytes)]`` of the buffers XLA lists as live at its peak program point."""
    out, inside = [], False
    for line in live_range_text.splitlines():
        if _PEAK.match(line):
            inside = True
            continue
        if inside:
            m = _LIVE.match(line)
            if not m:
                break
            out.append((m.group(1), int(m.group(3))))
    return out


def instruction_info(hlo_text: str) -> dict[str, tuple[str, str]]:
    """name -> (shape, where) for every instruction of an optimized HLO module's text, where = the
    ``source_file:line`` of its metadata (or its op_name, or '?')."""
    info = {}
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        src = _SRC.search(line)
        op = _OP.search(line)
        if src:
            path = src.group(1)
            where = f"{os.path.relpath(path) if path.startswith('/') else path}:{src.group(2)}"
        else:
            where = op.group(1)[-80:] if op else "(no metadata) " + re.sub(r"\.\d+$", "", m.group(1))
        info[m.group(1)] = (m.group(2), where)
    return info


def breakdown(dump_dir: str, top: int) -> dict:
    """The peak of the dumped module whose peak is largest, its live buffers grouped by source line."""
    best = None
    for path in glob.glob(os.path.join(dump_dir, "*-live-range.txt")):
        text = open(path).read()
        live = parse_peak(text)
        total = sum(b for _, b in live)
        if best is None or total > best[0]:
            best = (total, path, live)
    if best is None:
        raise FileNotFoundError(f"no *-live-range.txt under {dump_dir} (XLA_FLAGS={os.environ['XLA_FLAGS']})")
    total, path, live = best
    stem = path[: -len("-live-range.txt")]
    hlo = open(stem + ".txt").read() if os.path.exists(stem + ".txt") else ""
    info = instruction_info(hlo)
    by_src: dict[str, list] = collections.defaultdict(lambda: [0, 0, collections.Counter()])
    for name, size in live:
        shape, where = info.get(name, ("?", "(not in the module text) " + re.sub(r"\.\d+$", "", name)))
        g = by_src[where]
        g[0] += size
        g[1] += 1
        g[2][shape] += size
    rows = sorted(by_src.items(), key=lambda kv: -kv[1][0])[:top]
    return dict(
        module=os.path.basename(stem),
        peak_live_gib=total / 2**30,
        live_buffers=len(live),
        by_source=[
            dict(
                where=k,
                gib=round(v[0] / 2**30, 3),
                buffers=v[1],
                shapes=[f"{s} {b / 2**30:.3f}" for s, b in v[2].most_common(4)],
            )
            for k, v in rows
        ],
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage-config", required=True)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--top", type=int, default=30)
    args = p.parse_args()
    from benchmarks._stage import build_stage_step

    step, state, batch, frozen, *_ = build_stage_step(args.stage_config, args.set)
    _, metrics = step(state, batch, frozen)  # compiles (the dump) and runs once
    stats = jax.local_devices()[0].memory_stats() or {}
    out = dict(
        bench="memory-peak",
        config=args.stage_config,
        overrides=args.set,
        card=jax.devices()[0].device_kind,
        loss=float(metrics["loss"]),
        measured_peak_gib=stats.get("peak_bytes_in_use", 0) / 2**30,
    )
    out.update(breakdown(DUMP, args.top))
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
