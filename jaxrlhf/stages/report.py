"""The run report of a pipeline: ``report.md`` + PNG plots + the console summary, from the run directories.

``jaxrlhf report runs/<name>`` (re)writes it from what the stages left on disk, nothing else: each stage's
``metrics.jsonl`` (curves; the last eval values), ``samples.jsonl`` (the ground-truth rule score, the
answers),
``config.yaml`` (the sampling settings) and the pipeline's ``pipeline.json`` (time per stage)::

    report.md              summary table, plots, sample answers of the SFT and the final policy side by side
    curves_<stage>.png     every metric of the stage against the step (train and eval in one panel)
    rl_<stage>.png         reward- and KL-like metrics per iteration of an RL stage (whatever keys it logs)
    rule_score.png         the rule score (and its parts) of the SFT and the final policy

Plots use matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

import yaml

__all__ = ["format_summary", "read_stage", "summarize", "write_report"]

STAGE_ORDER = ("sft", "rm", "ppo", "grpo", "rloo", "dpo")
RL_STAGES = ("ppo", "grpo", "rloo")
# bookkeeping metrics left out of the curves
_NOT_PLOTTED = (
    "lr",
    "learning_rate",
    "tokens_per_s",
    "tokens_per_sec",
    "tokens_per_second",
    "mfu",
    "step_time",
    "seconds",
    "skipped",
    "nonfinite_skipped",
    "weight",
)
_MAX_PANELS = 12


def _read_jsonl(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def stages_of(run_dir: str) -> list[str]:
    """The stages of a pipeline run: the chain its last run recorded in ``pipeline.json``, else every stage
    directory with metrics (in pipeline order)."""
    present = [s for s in STAGE_ORDER if os.path.isfile(os.path.join(run_dir, s, "metrics.jsonl"))]
    pj = os.path.join(run_dir, "pipeline.json")
    if os.path.isfile(pj):
        with open(pj) as f:
            chain = json.load(f).get("chain")
        if chain and all(s in present for s in chain):
            return list(chain)
    return present


def read_stage(stage_dir: str) -> dict:
    """``{"metrics": [...], "samples": [...], "config": {...}, "last": {key: last value}}`` of a stage run."""
    metrics = _read_jsonl(os.path.join(stage_dir, "metrics.jsonl"))
    samples = _read_jsonl(os.path.join(stage_dir, "samples.jsonl"))
    config = {}
    cfg_path = os.path.join(stage_dir, "config.yaml")
    if os.path.isfile(cfg_path):
        with open(cfg_path, encoding="utf-8") as f:
            config = yaml.safe_load(f) or {}
    last: dict[str, float] = {}
    for record in metrics:
        for k, v in record.items():
            if k != "step" and _number(v) is not None:
                last[k] = float(v)
    return {"metrics": metrics, "samples": samples, "config": config, "last": last}


def _mean(samples: list[dict], key: str) -> float | None:
    values = [float(s[key]) for s in samples if _number(s.get(key)) is not None]
    return sum(values) / len(values) if values else None


def _pick(last: dict, names: Sequence[str], contains: str) -> tuple[str, float] | None:
    """The first of ``names`` present, else the shortest key containing ``contains`` (no eval / std)."""
    for n in names:
        if n in last:
            return n, last[n]
    keys = sorted((k for k in last if contains in k and "std" not in k and "coef" not in k), key=len)
    return (keys[0], last[keys[0]]) if keys else None


def sampling_label(config: dict) -> str:
    """``greedy`` or ``sampled (T=..., top-p ...)`` from a stage config's ``samples.sampling``."""
    s = (config.get("samples") or {}).get("sampling") or {}
    t = float(s.get("temperature", 0.0))
    if t == 0.0:
        return "greedy"
    extra = "".join(
        f", {name} {s[key]}"
        for key, name, off in (("top_k", "top-k", 0), ("top_p", "top-p", 1.0), ("min_p", "min-p", 0.0))
        if s.get(key, off) != off
    )
    return f"sampled (T={t:g}{extra})"


def summarize(run_dir: str) -> dict:
    """The numbers of the summary: per stage its headline metrics and time; the rule scores before/after."""
    stages = stages_of(run_dir)
    times = {}
    pj = os.path.join(run_dir, "pipeline.json")
    if os.path.isfile(pj):
        with open(pj) as f:
            times = json.load(f).get("stages", {})
    rows: dict[str, dict[str, float]] = {}
    for stage in stages:
        info = read_stage(os.path.join(run_dir, stage))
        last, row = info["last"], {}
        if stage == "sft":
            for k in ("eval/loss", "eval/accuracy"):
                if k in last:
                    row[k] = last[k]
        elif stage == "rm":
            for k in ("eval/accuracy", "eval/margin"):
                if k in last:
                    row[k] = last[k]
        elif stage == "dpo":
            for k in ("eval/rewards/accuracies", "eval/rewards/margins"):
                if k in last:
                    row[k] = last[k]
        else:
            for hit in (_pick(last, ("reward/mean", "rewards/mean", "reward"), "reward"),
                        _pick(last, ("kl", "kl/mean", "objective/kl"), "kl")):  # fmt: skip
                if hit is not None:
                    row[hit[0]] = hit[1]
        score = _mean(info["samples"], "rule_score")
        if score is not None:
            row["rule_score"] = score
        if stage in times:
            row["seconds"] = float(times[stage]["seconds"])
        rows[stage] = row
    out: dict[str, Any] = {"stages": rows, "order": stages}
    final = next((s for s in reversed(stages) if s != "rm"), None)
    if "sft" in rows and final and final != "sft":
        out["final"] = final
        for name, stage in (("rule_score_sft", "sft"), ("rule_score_final", final)):
            if "rule_score" in rows[stage]:
                out[name] = rows[stage]["rule_score"]
    return out


def _fmt(v: float) -> str:
    return f"{v:.1f}" if abs(v) >= 100 else f"{v:.4f}"


def format_summary(summary: dict) -> str:
    """The console table: one line per stage with its headline metrics, rule score and time."""
    lines = [f"{'stage':<6} {'time':>8}  metrics"]
    for stage in summary.get("order", []):
        row = dict(summary["stages"][stage])
        secs = row.pop("seconds", None)
        t = f"{secs:7.0f}s" if secs is not None else "       -"
        lines.append(f"{stage:<6} {t}  " + ", ".join(f"{k} {_fmt(v)}" for k, v in row.items()))
    if "rule_score_sft" in summary and "rule_score_final" in summary:
        a, b = summary["rule_score_sft"], summary["rule_score_final"]
        lines.append(f"rule score: SFT {_fmt(a)} -> {summary['final']} {_fmt(b)} ({b - a:+.4f})")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- plots


def _series(metrics: list[dict], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in metrics:
        v = _number(r.get(key))
        if v is not None:
            xs.append(int(r["step"]))
            ys.append(v)
    return xs, ys


def _plot_keys(metrics: list[dict], keys: list[str], path: str, title: str) -> bool:
    """One panel per key (``eval/<k>`` drawn with ``<k>``); False when there is nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for k in keys:
        base = k[len("eval/") :] if k.startswith("eval/") else k
        if base not in panels:
            panels.append(base)
    panels = panels[:_MAX_PANELS]
    if not panels:
        return False
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, base in zip(axes.flat, panels, strict=False):
        for key, style, label in ((base, "-", "train"), (f"eval/{base}", "o--", "eval")):
            xs, ys = _series(metrics, key)
            if xs:
                ax.plot(xs, ys, style, label=label, markersize=4)
        ax.set_title(base, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if len(ax.get_lines()) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def _metric_keys(metrics: list[dict]) -> list[str]:
    keys: list[str] = []
    for r in metrics:
        for k, v in r.items():
            if k == "step" or k in keys or _number(v) is None:
                continue
            if k.split("/")[-1] in _NOT_PLOTTED or k.startswith(("samples/", "reward_stats/")):
                continue
            keys.append(k)
    return keys


def _plot_rule(summary: dict, stage_samples: dict[str, list[dict]], path: str) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    final = summary.get("final")
    if final is None:
        return False
    parts = [k for k in ("rule_score", "correct", "polite") if _mean(stage_samples["sft"], k) is not None]
    if not parts:
        return False
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(parts), 3.2))
    width = 0.38
    for j, (stage, color) in enumerate((("sft", "tab:gray"), (final, "tab:green"))):
        values = [_mean(stage_samples[stage], k) or 0.0 for k in parts]
        xs = [i + (j - 0.5) * width for i in range(len(parts))]
        bars = ax.bar(xs, values, width, label=stage.upper(), color=color)
        for b, v in zip(bars, values, strict=True):
            ax.text(b.get_x() + b.get_width() / 2, v + 0.01, f"{v:.2f}", ha="center", fontsize=8)
    ax.set_xticks(range(len(parts)), parts)
    ax.set_ylim(0, 1.1)
    ax.set_title("ground-truth rule on the samples", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------- report.md


def _cell(text: str, limit: int = 120) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _samples_table(sft: dict, final: dict, final_name: str, n: int = 10) -> list[str]:
    by_prompt: dict[str, dict] = {}
    for s in final["samples"]:
        by_prompt.setdefault(s["prompt"], s)
    pairs = [(a, by_prompt[a["prompt"]]) for a in sft["samples"] if a["prompt"] in by_prompt][:n]
    if not pairs:
        return []
    la, lb = sampling_label(sft["config"]), sampling_label(final["config"])
    out = [
        f"## Sample answers (same prompts; SFT {la}, {final_name.upper()} {lb})",
        "",
        f"| prompt | SFT | {final_name.upper()} |",
        "|---|---|---|",
    ]
    for a, b in pairs:

        def score(s):
            return f" *({s['rule_score']:.2f})*" if _number(s.get("rule_score")) is not None else ""

        out.append(
            f"| {_cell(a['prompt'])} | {_cell(a['completion'])}{score(a)} "
            f"| {_cell(b['completion'])}{score(b)} |"
        )
    out.append("")
    out.append("*(n)*: the ground-truth rule's score of that answer.")
    return out


def write_report(run_dir: str) -> dict:
    """Write ``report.md`` and the PNGs under ``run_dir`` (module docstring); return :func:`summarize`."""
    run_dir = os.path.abspath(run_dir)
    stages = stages_of(run_dir)
    if not stages:
        raise FileNotFoundError(
            f"{run_dir}: no stage run directories (sft/, rm/, ppo/, dpo/ ...) with metrics"
        )
    summary = summarize(run_dir)
    infos = {s: read_stage(os.path.join(run_dir, s)) for s in stages}
    md = [f"# Run report: {os.path.basename(run_dir)}", "", "Stages: " + " -> ".join(stages), ""]
    md += ["## Summary", "", "| stage | time (s) | metric | value |", "|---|---|---|---|"]
    for stage in stages:
        row = dict(summary["stages"][stage])
        secs = row.pop("seconds", None)
        t = f"{secs:.0f}" if secs is not None else "-"
        for i, (k, v) in enumerate(row.items() or [("-", float("nan"))]):
            md.append(f"| {stage if i == 0 else ''} | {t if i == 0 else ''} | {k} | {_fmt(v)} |")
    if "rule_score_final" in summary and "rule_score_sft" in summary:
        a, b = summary["rule_score_sft"], summary["rule_score_final"]
        md += ["", f"Rule score (ground truth, never trained on): SFT {_fmt(a)} -> "
               f"{summary['final'].upper()} {_fmt(b)} ({b - a:+.4f})."]  # fmt: skip
    md.append("")
    for stage in stages:
        png = f"curves_{stage}.png"
        keys = _metric_keys(infos[stage]["metrics"])
        if _plot_keys(infos[stage]["metrics"], keys, os.path.join(run_dir, png), f"{stage}: training curves"):
            md += [f"## {stage.upper()} training curves", "", f"![{stage} curves]({png})", ""]
        if stage in RL_STAGES:
            rl_keys = [k for k in keys if "reward" in k or "kl" in k.split("/")[-1] or k.startswith("kl")]
            png = f"rl_{stage}.png"
            if _plot_keys(
                infos[stage]["metrics"], rl_keys, os.path.join(run_dir, png), f"{stage}: reward / KL"
            ):
                md += [
                    f"## {stage.upper()} reward and KL per iteration",
                    "",
                    f"![{stage} reward/KL]({png})",
                    "",
                ]
    samples = {s: infos[s]["samples"] for s in stages}
    if _plot_rule(summary, samples, os.path.join(run_dir, "rule_score.png")):
        md += ["## Rule score before and after", "", "![rule score](rule_score.png)", ""]
    final = summary.get("final")
    if final is not None:
        md += _samples_table(infos["sft"], infos[final], final)
    with open(os.path.join(run_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(md) + "\n")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """``jaxrlhf report RUN_DIR``: rewrite ``report.md`` and the plots; print the summary."""
    import argparse
    import sys

    p = argparse.ArgumentParser(
        prog="jaxrlhf report", description="rewrite a pipeline run's report.md + plots"
    )
    p.add_argument("run_dir", help="the pipeline's run directory, e.g. runs/tiny-pipeline")
    p.add_argument("--log-level", default="INFO", help="debug: tracebacks on errors")
    args = p.parse_args(argv)
    try:
        summary = write_report(args.run_dir)
    except FileNotFoundError as e:
        if args.log_level.upper() == "DEBUG":
            raise
        print(f"jaxrlhf report: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    print(f"report: {os.path.join(os.path.abspath(args.run_dir), 'report.md')}")
    return 0
