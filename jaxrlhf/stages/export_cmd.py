"""``jaxrlhf export``: any stage checkpoint -> a merged Hugging Face directory or a PEFT adapter directory.

  jaxrlhf export --checkpoint runs/tiny-sft/stage --out exported/sft            # merged HF model + tokenizer
  jaxrlhf export --checkpoint runs/x/stage --out exported/x-peft --format peft   # LoRA adapters only
  jaxrlhf export --checkpoint runs/tiny-rm/stage --out exported/rm               # *ForSequenceClassification

``hf``: the base with the stage's LoRA adapters merged in, written by ``models.save_pretrained`` (a reward
model's checkpoint becomes a ``*ForSequenceClassification`` model scoring like the stage); ``peft``: the
adapters as a PEFT directory (``PeftModel.from_pretrained(base, out)``; LoRA checkpoints only). The stage's
tokenizer (with its chat template) is written beside either.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

logger = logging.getLogger("jaxrlhf.export")

__all__ = ["build_parser", "export", "run_export"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jaxrlhf export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--checkpoint", required=True, help="a stage checkpoint directory (runs/<name>/stage)")
    p.add_argument("--out", required=True, help="the directory to write (must not exist or be empty)")
    p.add_argument("--format", choices=("hf", "peft"), default="hf", help="default: hf (merged weights)")
    p.add_argument("--dtype", default=None, help="cast floating weights (e.g. bfloat16; default: as saved)")
    p.add_argument("--log-level", default="INFO", help="debug: tracebacks on errors")
    return p


def export(checkpoint: str, out: str, *, fmt: str = "hf", dtype: str | None = None) -> str:
    """Write ``out`` from the stage checkpoint (module docstring); returns ``out``."""
    import jax.numpy as jnp

    from jaxrlhf import data, models, train
    from jaxrlhf import lora as lora_lib
    from jaxrlhf.stages import common

    if not common.is_stage_checkpoint(checkpoint):
        raise FileNotFoundError(f"--checkpoint {checkpoint}: not a stage checkpoint (no stage.json)")
    if os.path.isdir(out) and os.listdir(out):
        raise FileExistsError(f"--out {out} exists and is not empty")
    cast = jnp.dtype(dtype) if dtype else None
    with open(os.path.join(checkpoint, "stage.json")) as f:
        stage = json.load(f).get("stage")
    ckpt = train.load_stage(checkpoint, dtype=cast, extras=("reward_head",) if stage == "rm" else ())
    tok_dir = ckpt.tokenizer_dir or os.path.join(checkpoint, "tokenizer")
    tokenizer = data.load_tokenizer(tok_dir)
    if fmt == "peft":
        if ckpt.lora is None:
            raise ValueError(
                f"{checkpoint}: a full fine-tuning checkpoint has no LoRA adapters: use --format hf"
            )
        base_path = (ckpt.base or {}).get("path")
        lora_lib.save_peft(ckpt.spec, ckpt.lora, ckpt.lora_config, out, base_model=base_path)
    else:
        merged = (
            ckpt.params if ckpt.lora is None else lora_lib.merge(ckpt.params, ckpt.lora, ckpt.lora_config)
        )
        if stage == "rm":
            from jaxrlhf.stages import rm

            rm._export(ckpt.spec, merged, ckpt.extras["reward_head"], tokenizer, out)
            if not os.path.isdir(out):
                raise ValueError(
                    f"{ckpt.spec.model_type} reward models have no HF sequence-classification export"
                )
            return out
        models.save_pretrained(ckpt.spec, merged, out)
    tokenizer.save_pretrained(out)
    logger.info("%s export of %s (%s stage): %s", fmt, checkpoint, stage, out)
    return out


def run_export(argv: Sequence[str]) -> int:
    """Entry point of ``jaxrlhf export``; user errors are one message and exit status 2."""
    args = build_parser().parse_args(list(argv))
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.INFO))
    try:
        out = export(args.checkpoint, args.out, fmt=args.format, dtype=args.dtype)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        if args.log_level.upper() == "DEBUG":
            raise
        print(f"jaxrlhf export: {e}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} -> {out} ({args.format})")
    if args.format == "hf":
        print(f"load it: transformers.AutoModel*.from_pretrained({out!r})")
    else:
        print(f"load it: peft.PeftModel.from_pretrained(base_model, {out!r})")
    return 0
