"""``jaxrlhf score``: score rows with a reward-model stage checkpoint.

  jaxrlhf score --checkpoint runs/tiny-rm/stage --pairs completions.jsonl --output scores.jsonl
  jaxrlhf score --checkpoint runs/tiny-rm/stage --pairs prefs.jsonl --normalize     # chosen vs rejected

Rows (any file, directory or glob the data layer reads; errors name the file, row, 1-based line and field):

- ``prompt`` + ``completion`` (strings, or TRL's conversational message lists: e.g. what
  ``jaxrlhf generate --output`` writes), and also ``messages`` conversations and ``text`` rows: each scored
  whole, ``r = RM(prompt ++ completion)``;
- ``prompt`` + ``chosen`` / ``rejected`` (any preference layout the RM stage trains on, optional
  ``margin``): both sides scored, and the RM eval's metrics reported (accuracy = fraction with
  ``r_chosen > r_rejected``, mean margin ``r_chosen - r_rejected``, loss, reward mean / std).

Rows are tokenised exactly as the RM stage tokenised its training pairs: the same data path
(:func:`jaxrlhf.data.build_dataset`) with the stage's tokenizer (and chat template) and its
``data.max_length`` / ``max_prompt_length`` / ``truncation`` (from the checkpoint's ``stage.json``).
Scores are :func:`jaxrlhf.reward_model.score` (the head at the last token), in fixed batches of
``--batch-size`` padded to a power-of-two length bucket (one compile per bucket), on all devices (the
batch split over the mesh like the RM eval's). ``--normalize``: ``(r - mean) / std`` with the RM's
``reward_stats.json`` (what PPO feeds the policy). ``--output``: one JSON line per scored row, the source row
plus ``index`` and ``reward`` (or ``r_chosen`` / ``r_rejected``); a summary line goes to the console.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np

logger = logging.getLogger("jaxrlhf.score")

__all__ = ["build_parser", "run_score", "score", "score_sequences"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jaxrlhf score", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--checkpoint", required=True, help="a reward-model stage checkpoint (runs/<rm>/stage)")
    p.add_argument(
        "--pairs", required=True, help="rows: prompt + completion, or prompt + chosen / rejected (jsonl ...)"
    )
    p.add_argument("--output", help="write one JSON line per scored row here")
    p.add_argument("--normalize", action="store_true", help="(r - mean) / std from reward_stats.json")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass (default 16)")
    p.add_argument("--max-length", type=int, help="token limit (default: the RM stage's data.max_length)")
    p.add_argument("--on-bad-row", choices=("error", "skip"), default="error", help="skip: drop and count")
    p.add_argument("--dtype", default=None, help="parameter dtype (e.g. bfloat16; default: as saved)")
    p.add_argument("--compute-dtype", help="activation dtype (default: the parameter dtype)")
    p.add_argument("--log-level", default="INFO", help="debug: tracebacks on errors")
    return p


def score_sequences(
    rm: Any, seqs: Sequence[Sequence[int]], *, batch_size: int, max_length: int, mesh: Any, compute_dtype=None
) -> np.ndarray:
    """Rewards ``[N]`` float32 of token-id sequences (each scored at its last token).

    Batches of ``batch_size`` rows (rounded up to a multiple of the mesh's batch devices; the last batch
    filled by repeating its first row), right-padded to ``generation.bucket_length`` of their longest row
    (capped at ``max(longest, max_length)``); ``rm``: a :class:`jaxrlhf.reward_model.RewardModel` on ``mesh``.
    """
    import jax

    from jaxrlhf import generation, reward_model, sharding
    from jaxrlhf.data.packing import pad_right
    from jaxrlhf.stages import runner

    if not seqs:
        return np.zeros((0,), np.float32)
    devices = int(np.prod([mesh.shape[a] for a in ("data", "fsdp")]))
    batch_size = -(-batch_size // devices) * devices

    @jax.jit
    def fn(params, lora, head, ids, mask):
        return reward_model.score(
            rm.spec,
            params,
            head,
            ids,
            mask,
            lora=lora,
            lora_config=rm.lora_config,
            compute_dtype=compute_dtype,
        )

    out = []
    with sharding.use_mesh(mesh):
        for start in range(0, len(seqs), batch_size):
            rows = [list(s) for s in seqs[start : start + batch_size]]
            real = len(rows)
            rows += [rows[0]] * (batch_size - real)
            longest = max(map(len, rows))
            width = min(generation.bucket_length(longest), max(longest, max_length))
            batch = {
                "ids": pad_right(rows, width, 0),
                "mask": pad_right([[1] * len(r) for r in rows], width, 0),
            }
            batch = runner.global_from_full(batch, mesh)
            r = runner.host_array(fn(rm.params, rm.lora, rm.head, batch["ids"], batch["mask"]))
            out.append(np.asarray(r, np.float32)[:real])
    return np.concatenate(out)


def _stage_config(checkpoint: str) -> dict:
    with open(os.path.join(checkpoint, "stage.json")) as f:
        info = json.load(f)
    if info.get("stage") != "rm":
        raise ValueError(
            f"--checkpoint {checkpoint}: a {info.get('stage')!r} stage checkpoint, not a reward model "
            "('rm'); sample from a policy with `jaxrlhf generate`"
        )
    return info.get("config") or {}


def score(
    checkpoint: str,
    pairs: str,
    *,
    batch_size: int = 16,
    max_length: int | None = None,
    normalize: bool = False,
    on_bad_row: str = "error",
    dtype: str | None = None,
    compute_dtype: str | None = None,
) -> tuple[str, list[dict], dict]:
    """Score the rows of ``pairs`` (module docstring) -> ``(kind, rows, summary)``.

    ``kind``: ``"pairs"`` (preference rows) or ``"completions"``; ``rows``: per scored source row, its
    ``index`` (0-based row of the source) and ``reward``, or ``r_chosen`` / ``r_rejected``; ``summary``:
    ``count``, ``skipped``, ``normalized`` and the reward mean / std / min / max, or for pairs the RM eval's
    metrics (:func:`jaxrlhf.stages.rm.pair_metrics`).
    """
    import jax.numpy as jnp

    from jaxrlhf import data, reward_model
    from jaxrlhf.stages import common, rm

    if not common.is_stage_checkpoint(checkpoint):
        raise FileNotFoundError(f"--checkpoint {checkpoint}: not a stage checkpoint (no stage.json)")
    cfg = _stage_config(checkpoint)
    dcfg, tcfg = cfg.get("data") or {}, cfg.get("train") or {}
    mesh = common.make_mesh(common.MeshConfig())
    model = reward_model.load(checkpoint, mesh=mesh, dtype=jnp.dtype(dtype) if dtype else None)
    tokenizer = data.load_tokenizer(model.tokenizer_dir or os.path.join(checkpoint, "tokenizer"))
    limit = max_length or int(dcfg.get("max_length") or 512)
    prompt_limit = dcfg.get("max_prompt_length")
    with tempfile.TemporaryDirectory(prefix="jaxrlhf-score-") as cache:
        config = data.DataConfig(
            path=pairs,
            max_length=limit,
            max_prompt_length=prompt_limit if prompt_limit is not None and prompt_limit < limit else None,
            truncation=dcfg.get("truncation", "left"),
            shuffle=False,
            on_bad_row=on_bad_row,
            cache_dir=cache,
        )
        kind = "preference" if data.detect_format(_columns(pairs, config)) == "preference" else "sft"
        ds = data.build_dataset(config, tokenizer, kind)
        examples = ds.data.to_list()
        raw = ds.raw
    prefix = "chosen_" if kind == "preference" else ""
    seqs = [e[f"{prefix}input_ids"] for e in examples]
    if kind == "preference":
        seqs += [e["rejected_input_ids"] for e in examples]
    kw = dict(
        batch_size=batch_size, max_length=limit, mesh=mesh, compute_dtype=common.dtype_of(compute_dtype)
    )
    r = score_sequences(model, seqs, **kw)
    if normalize:
        r = (r - float(model.stats["mean"])) / max(float(model.stats["std"]), 1e-8)
    base = {"count": len(examples), "skipped": ds.skipped, "normalized": normalize}
    rows = []
    if kind == "preference":
        r_c, r_r = r[: len(examples)], r[len(examples) :]
        margins = np.asarray([e["margin"] for e in examples], np.float32)
        summary = {**base, **rm.pair_metrics(r_c, r_r, margins, center_coef=tcfg.get("center_coef", 0.0),
                                             use_margin=tcfg.get("use_margin", True))}  # fmt: skip
        for e, c, x in zip(examples, r_c, r_r, strict=True):
            rows.append(
                {**_source(raw, e), "index": e["index"], "r_chosen": float(c), "r_rejected": float(x)}
            )
        return "pairs", rows, summary
    stats = {"reward_mean": float(r.mean()), "reward_std": float(r.std()), "reward_min": float(r.min()),
             "reward_max": float(r.max())} if len(r) else {}  # fmt: skip
    for e, x in zip(examples, r, strict=True):
        rows.append({**_source(raw, e), "index": e["index"], "reward": float(x)})
    return "completions", rows, {**base, **stats}


def _columns(path: str, config) -> list[str]:
    """The column names of the first source file (to choose preference or whole-row scoring)."""
    from jaxrlhf.data.sources import load_sources

    ds = load_sources(path, config.split, on_bad_row=config.on_bad_row, cache_dir=config.cache_dir)[0][1]
    return list(ds.column_names or [])


def _source(raw: Any, example: dict) -> dict:
    """The source row of a scored example (its JSON-able columns), or nothing when it is not at hand."""
    if raw is None:
        return {}
    row = raw[int(example["index"])]
    return {k: v for k, v in row.items() if not k.startswith("__jaxrlhf")}


def summary_line(checkpoint: str, kind: str, summary: dict) -> str:
    """The console line: how many rows were scored and the metrics."""
    skipped = f" ({summary['skipped']} bad rows skipped)" if summary.get("skipped") else ""
    norm = ", normalized" if summary.get("normalized") else ""
    if kind == "pairs":
        return (
            f"scored {summary['count']} pairs with {checkpoint}{skipped}{norm}: accuracy "
            f"{summary['accuracy']:.4f}, margin {summary['margin']:.4f}, loss {summary['loss']:.4f}, "
            f"reward mean {summary['reward_mean']:.4f} std {summary['reward_std']:.4f}"
        )
    if not summary["count"]:
        return f"scored 0 rows with {checkpoint}{skipped}"
    return (
        f"scored {summary['count']} completions with {checkpoint}{skipped}{norm}: reward mean "
        f"{summary['reward_mean']:.4f} std {summary['reward_std']:.4f} min {summary['reward_min']:.4f} "
        f"max {summary['reward_max']:.4f}"
    )


def run_score(argv: Sequence[str]) -> int:
    """Entry point of ``jaxrlhf score``; user errors are one message and exit status 2."""
    from jaxrlhf import data

    args = build_parser().parse_args(list(argv))
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.INFO))
    try:
        kind, rows, summary = score(
            args.checkpoint,
            args.pairs,
            batch_size=args.batch_size,
            max_length=args.max_length,
            normalize=args.normalize,
            on_bad_row=args.on_bad_row,
            dtype=args.dtype,
            compute_dtype=args.compute_dtype,
        )
    except (FileNotFoundError, ValueError, data.DataError) as e:
        if args.log_level.upper() == "DEBUG":
            raise
        print(f"jaxrlhf score: {e}", file=sys.stderr)
        return 2
    if args.output:
        from jaxrlhf.stages import common

        if common.is_primary():
            os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
            with open(args.output, "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    print(summary_line(args.checkpoint, kind, summary))
    return 0
