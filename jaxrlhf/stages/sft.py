"""Supervised fine-tuning: ``jaxrlhf sft --config FILE.yaml --set key=value ...``.

Full or LoRA fine-tuning of a decoder-only model (``prompt``/``completion``, chat ``messages`` with
assistant-only loss, or plain ``text``; optional packing) or a T5 model (``inputs``/``targets``, or
``prompt``/``completion`` as inputs/targets), from a HF directory, a stage checkpoint, or from scratch (a
``model.spec`` mapping). The loss is the token-mean cross entropy over the target tokens
(:func:`jaxrlhf.losses.sft_loss`); for decoder-only batches the logits at ``t - 1`` predict token ``t``
where ``loss_mask[t] = 1``, for T5 the logits at ``t`` predict ``labels[t]``.

Everything goes under the run directory ``output_dir`` (default ``runs/<name>/``)::

    config.yaml      the resolved config            metrics.jsonl, tensorboard/   train + eval metrics
    checkpoints/     Orbax train states (resumed)   stage/     the stage checkpoint for the next stage
    export/hf/       merged HF model + tokenizer    export/peft/   PEFT adapters (LoRA runs)
    samples.jsonl    generations at the end (with the rule's score when ``samples.rule`` is set)
    tokenizer/, cache/   the tiny tokenizer (when ``tokenizer.path: tiny``) and the tokenized-data cache
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, NamedTuple

import jax

from jaxrlhf import data, losses, models
from jaxrlhf import lora as lora_lib
from jaxrlhf import train as train_lib
from jaxrlhf.generation import SamplingConfig
from jaxrlhf.stages import common, runner
from jaxrlhf.stages.common import CheckpointConfig, ExportConfig, LoopConfig, ModelConfig, TokenizerConfig
from jaxrlhf.stages.samples import SampleConfig, write_samples

logger = logging.getLogger("jaxrlhf.sft")

__all__ = ["SFTConfig", "SFTResult", "SFTTrainConfig", "SampleConfig", "make_loss_fn", "run", "segment_bound"]


@dataclasses.dataclass(frozen=True)
class SFTTrainConfig(LoopConfig):
    """Loop settings (:class:`~jaxrlhf.stages.common.LoopConfig`) + the loss's: ``label_smoothing``,
    ``z_loss``. The number of optimizer steps is ``optim.total_steps`` (also the schedule's length)."""

    label_smoothing: float = 0.0
    z_loss: float = 0.0


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    data: data.DataConfig
    name: str = "sft"
    output_dir: str | None = None
    model: ModelConfig = ModelConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    optim: train_lib.OptimConfig = train_lib.OptimConfig()
    lora: lora_lib.LoraConfig | None = None
    train: SFTTrainConfig = SFTTrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    export: ExportConfig = ExportConfig()
    samples: SampleConfig = SampleConfig(sampling=SamplingConfig(max_new_tokens=32, temperature=0.0))


class SFTResult(NamedTuple):
    run_dir: str
    stage_dir: str
    train_metrics: dict  # last logged train metrics
    eval_metrics: dict  # last eval metrics (loss, ppl, accuracy)
    first_eval: dict  # eval metrics before training (fresh runs only; else {})
    samples: dict  # summary of the sample generations (e.g. rule_score)


def segment_bound(cfg: SFTConfig, ds: Any = None) -> int:
    """The static ``max_segments`` of the SFT forward: 1 unpacked (one run of real tokens per row); packed,
    the most examples in a row of the dataset and its eval split when known (fewer empty segments for the
    fused kernel to skip), else the packer's cap ``data.max_segments_per_row``."""
    if not cfg.data.packing:
        return 1
    parts = [d for d in (ds, getattr(ds, "eval", None)) if d is not None]
    known = [d.max_segments for d in parts]
    if parts and all(k is not None for k in known):
        return max(known)
    return cfg.data.max_segments_per_row


def make_loss_fn(
    spec: models.ModelSpec,
    cfg: SFTConfig,
    lora_config: lora_lib.LoraConfig | None,
    max_segments: int | None = None,
):
    """``loss_fn(trainable, frozen, batch, rng) -> (loss, metrics)`` for the train step.

    Full fine-tuning: ``trainable`` = params, ``frozen`` = None; LoRA: ``trainable`` = adapters,
    ``frozen`` = base params. Metrics carry ``weight`` = number of target tokens, so gradient accumulation
    and evaluation average over tokens exactly.
    """
    m, t = cfg.model, cfg.train
    compute_dtype = common.dtype_of(m.compute_dtype)
    use_dropout = lora_config is not None and lora_config.dropout > 0

    def loss_fn(trainable, frozen, batch, rng):
        base, adapters = (frozen, trainable) if lora_config is not None else (trainable, None)
        kw: dict[str, Any] = dict(
            lora=adapters,
            lora_config=lora_config,
            compute_dtype=compute_dtype,
            remat=m.remat,
            attention_impl=m.attention_impl,
            dropout_rng=rng if use_dropout else None,
        )
        # the loader's rows hold at most this many examples (runs of one segment id): the fused attention
        # takes their lengths + offsets instead of a dense [B, 1, T, T] mask
        bound = segment_bound(cfg) if max_segments is None else max_segments
        if spec.is_encoder_decoder:
            out = models.forward(
                spec,
                base,
                batch["input_ids"],
                batch["attention_mask"],
                decoder_input_ids=batch["decoder_input_ids"],
                decoder_attention_mask=batch["decoder_attention_mask"],
                **kw,
            )
            logits, targets, mask = out.logits, batch["labels"], batch["loss_mask"]
        else:
            out = models.forward(
                spec,
                base,
                batch["input_ids"],
                batch["attention_mask"],
                positions=batch["positions"],
                segment_ids=batch["segment_ids"],
                max_segments=bound,
                **kw,
            )
            # the head + loss in sequence chunks (no [B, T, V] f32 logits; forward's unused logits are
            # dead code under jit): position t predicts token t + 1, the last position has no target
            ids, lmask = batch["input_ids"], batch["loss_mask"]
            vm = models.lm_head_vocab_major(spec)  # a tied embedding is used as stored ([V, E])
            h, kernel = models.lm_head_operands(
                spec, base, out.hidden, compute_dtype=compute_dtype, vocab_major=vm
            )
            targets, mask = losses.next_token_targets(ids, lmask)
            # only the loss positions go through the head; its logits come out in the compute dtype (as
            # an autocast LM head's), the softmax reductions run in f32
            loss, lm = losses.chunked_sft_loss(
                h, kernel, targets, mask, label_smoothing=t.label_smoothing, z_loss=t.z_loss,
                logits_dtype=compute_dtype, vocab_major=vm,
            )  # fmt: skip
            return loss, {"accuracy": lm["accuracy"], "nll": lm["nll"], "weight": lm["token_count"]}
        loss, lm = losses.sft_loss(logits, targets, mask, label_smoothing=t.label_smoothing, z_loss=t.z_loss)
        return loss, {"accuracy": lm["accuracy"], "nll": lm["nll"], "weight": lm["token_count"]}

    return loss_fn


def run(config: SFTConfig) -> SFTResult:
    """Run the SFT stage end to end (see the module docstring); resumes from ``checkpoints/`` if present."""
    r = runner.start(config, "sft")
    spec, lcfg = r.spec, config.lora
    dcfg = common.data_config(config.data, r.out)
    ds = runner.build_dataset(r, dcfg, "seq2seq" if spec.is_encoder_decoder else "sft")
    if ds.eval is None:
        logger.warning("no eval split (set data.eval_fraction or data.eval_split): no eval metrics")
    axes = models.param_axes(spec)
    if lcfg is not None:
        adapters = lora_lib.init(spec, r.params, lcfg, r.fold(1), dtype=common.ADAPTER_DTYPE)
        loss_fn = make_loss_fn(spec, config, lcfg, segment_bound(config, ds))
        job = runner.Training(loss_fn, adapters, lora_lib.param_axes(axes, adapters), frozen=r.params)
    else:
        job = runner.Training(make_loss_fn(spec, config, None, segment_bound(config, ds)), r.params, axes)
    r.params = None  # full fine-tuning: the train state owns (and donates) the weights now
    out = runner.train(r, job, ds)
    step = int(jax.device_get(out.state.step))
    if out.interrupted:
        runner.finish(out, step)
        return SFTResult(r.out, "", out.train_metrics, out.eval_metrics, out.first_eval, {})
    base, adapters = (job.frozen, out.state.params) if lcfg is not None else (out.state.params, None)
    stage_dir = runner.save(
        r,
        base=base,
        adapters=adapters,
        lora_config=lcfg,
        info={"step": step, "eval": out.eval_metrics},
        export=config.export,
    )
    summary = write_samples(
        config.samples, r.out, spec, base, adapters, lcfg, r.tokenizer, dcfg, r.mesh, r.fold(3),
        compute_dtype=common.dtype_of(config.model.compute_dtype),
    )  # fmt: skip
    runner.finish(out, step, {f"samples/{k}": v for k, v in summary.items()})
    return SFTResult(r.out, stage_dir, out.train_metrics, out.eval_metrics, out.first_eval, summary)
