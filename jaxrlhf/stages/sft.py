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
import os
from typing import Any, NamedTuple

import jax
from jax.sharding import NamedSharding

from jaxrlhf import data, losses, models, sharding
from jaxrlhf import lora as lora_lib
from jaxrlhf import train as train_lib
from jaxrlhf.config import dump_yaml, to_dict
from jaxrlhf.generation import SamplingConfig
from jaxrlhf.stages import common
from jaxrlhf.stages.common import CheckpointConfig, ExportConfig, MeshConfig, ModelConfig, TokenizerConfig
from jaxrlhf.stages.samples import SampleConfig, write_samples

logger = logging.getLogger("jaxrlhf.sft")

__all__ = ["SFTConfig", "SFTResult", "SFTTrainConfig", "SampleConfig", "make_loss_fn", "run"]


@dataclasses.dataclass(frozen=True)
class SFTTrainConfig:
    """Loop settings. The number of optimizer steps is ``optim.total_steps`` (also the schedule's length);
    ``eval_batches``: null = the whole eval split (``data.eval_fraction`` / ``data.eval_split``)."""

    eval_every: int = 100
    eval_batches: int | None = None
    log_every: int = 10
    seed: int = 0
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    mesh: MeshConfig = MeshConfig()
    tensorboard: bool = True
    progress: bool = True


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


def make_loss_fn(spec: models.ModelSpec, cfg: SFTConfig, lora_config: lora_lib.LoraConfig | None):
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
                **kw,
            )
            logits, targets, mask = out.logits[:, :-1], batch["input_ids"][:, 1:], batch["loss_mask"][:, 1:]
        loss, lm = losses.sft_loss(logits, targets, mask, label_smoothing=t.label_smoothing, z_loss=t.z_loss)
        return loss, {"accuracy": lm["accuracy"], "nll": lm["nll"], "weight": lm["token_count"]}

    return loss_fn


class _Batches:
    """Loader -> global arrays (``[k, B/k, ...]`` micro-batches when ``grad_accum = k > 1``); ``state()``
    for the checkpoint. Each process passes its own rows (``jax.make_array_from_process_local_data``)."""

    def __init__(self, loader: data.Loader, mesh, grad_accum: int):
        self.loader, self.mesh, self.k = loader, mesh, grad_accum

    def state(self) -> dict:
        return self.loader.state()

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.loader)
        if self.k == 1:
            return data.to_global(batch, self.mesh)
        out = {}
        for name, x in batch.items():
            if x.shape[0] % self.k:
                raise ValueError(f"per-host batch {x.shape[0]} is not divisible by optim.grad_accum={self.k}")
            x = x.reshape((self.k, x.shape[0] // self.k) + x.shape[1:])
            spec = sharding.logical_to_spec((None, "batch") + (None,) * (x.ndim - 2), self.mesh)
            out[name] = jax.make_array_from_process_local_data(NamedSharding(self.mesh, spec), x)
        return out


def run(config: SFTConfig) -> SFTResult:
    """Run the SFT stage end to end (see the module docstring); resumes from ``checkpoints/`` if present."""
    out = common.run_dir(config.name, config.output_dir)
    if jax.process_index() == 0:
        dump_yaml(config, os.path.join(out, "config.yaml"))
    mesh = common.make_mesh(config.train.mesh)
    model_path = common.resolve_path(config.model.path)
    tokenizer = common.load_tokenizer(config.tokenizer, model_path, out)
    rng = jax.random.PRNGKey(config.train.seed)
    spec, params = common.load_model(config.model, model_path, tokenizer, mesh, rng)
    n_params = models.count_params(spec)
    logger.info("model %s: %.2fM params on mesh %s", spec.model_type, n_params / 1e6, dict(mesh.shape))

    dcfg = common.data_config(config.data, out)
    kind = "seq2seq" if spec.is_encoder_decoder else "sft"
    ds = data.build_dataset(dcfg, tokenizer, kind=kind)
    if ds.eval is None:
        logger.warning("no eval split (set data.eval_fraction or data.eval_split): no eval metrics")

    lcfg = config.lora
    optim = config.optim
    opt = train_lib.make_optimizer(optim)
    axes = models.param_axes(spec)
    if lcfg is not None:
        adapters = lora_lib.init(
            spec, params, lcfg, jax.random.fold_in(rng, 1), dtype=common.dtype_of(config.model.dtype)
        )
        state, shard = train_lib.init_train_state(
            adapters,
            opt,
            jax.random.fold_in(rng, 2),
            frozen=params,
            mesh=mesh,
            params_axes=lora_lib.param_axes(axes, adapters),
            frozen_axes=axes,
        )
    else:
        state, shard = train_lib.init_train_state(
            params, opt, jax.random.fold_in(rng, 2), mesh=mesh, params_axes=axes
        )
    del params
    loss_fn = make_loss_fn(spec, config, lcfg)
    step_fn, loader, mgr, state = common.prepare_training(
        loss_fn, opt, optim, shard, mesh, ds, dcfg, config.checkpoint, out, state
    )

    eval_fn = None
    if ds.eval is not None:
        eval_step = train_lib.make_eval_step(loss_fn)
        eval_fn = common.make_eval_fn(eval_step, ds.eval, dcfg.batch_size, config.train.eval_batches, mesh)
    writer = (
        train_lib.MetricsWriter(out, tensorboard=config.train.tensorboard)
        if jax.process_index() == 0
        else None
    )
    first_eval = {}
    if eval_fn is not None and int(jax.device_get(state.step)) == 0:
        first_eval = eval_fn(state)
        if writer is not None:
            writer.write(0, {f"eval/{k}": v for k, v in first_eval.items()})
        logger.info("eval at step 0: %s", first_eval)
    seq = dcfg.max_length
    flops = train_lib.flops_per_token(n_params, spec.num_layers, seq, spec.hidden_size)
    result = train_lib.train_loop(
        state,
        step_fn,
        _Batches(loader, mesh, optim.grad_accum),
        total_steps=optim.total_steps,
        eval_fn=eval_fn,
        eval_every=config.train.eval_every,
        ckpt_manager=mgr,
        writer=writer,
        log_every=config.train.log_every,
        flops_per_token=flops,
        peak_flops=train_lib.peak_flops(jax.devices()[0].device_kind),
        progress=config.train.progress,
    )
    mgr.close()
    state = result.state
    logger.info("train: %s; eval: %s", result.last_metrics, result.eval_metrics)
    if result.interrupted:
        logger.warning(
            "interrupted at step %d: checkpoint saved, rerun the same command to resume",
            int(jax.device_get(state.step)),
        )
        if writer is not None:
            writer.close()
        return SFTResult(out, "", result.last_metrics, result.eval_metrics, first_eval, {})

    base, adapters = (state.frozen, state.params) if lcfg is not None else (state.params, None)
    stage_dir = common.save_outputs(
        out,
        "sft",
        spec,
        base,
        adapters,
        lcfg,
        tokenizer,
        config.export,
        model_path,
        info={
            "step": int(jax.device_get(state.step)),
            "eval": result.eval_metrics,
            "config": to_dict(config),
        },
    )
    summary = write_samples(
        config.samples,
        out,
        spec,
        base,
        adapters,
        lcfg,
        tokenizer,
        dcfg,
        mesh,
        jax.random.fold_in(rng, 3),
        compute_dtype=common.dtype_of(config.model.compute_dtype),
    )
    if writer is not None:
        if summary:
            writer.write(int(jax.device_get(state.step)), {f"samples/{k}": v for k, v in summary.items()})
        writer.close()
    return SFTResult(out, stage_dir, result.last_metrics, result.eval_metrics, first_eval, summary)
