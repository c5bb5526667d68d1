"""Reward modelling: ``jaxrlhf rm --config FILE.yaml --set key=value ...``.

A backbone (from an SFT stage checkpoint, a HF directory, or a fresh ``model.spec``) plus a scalar head
(:mod:`jaxrlhf.models.heads`) learns from comparisons (``prompt``/``chosen``/``rejected`` rows, strings or
chat messages, optional ``margin``) with the Bradley-Terry loss (:func:`jaxrlhf.losses.reward_loss`):

    r = head(hidden at the last token of prompt + response)
    loss = mean -log sigmoid(r_chosen - r_rejected - margin) + center_coef * mean (r_chosen + r_rejected)^2

Chosen and rejected rows are scored in one forward pass: decoder-only models as shared-prompt rows
``[prompt | chosen | rejected]`` (:mod:`jaxrlhf.pairs`: the prompt computed once per pair, the same scores),
T5 concatenated along the batch. Full fine-tuning
trains backbone + head; with ``lora`` set, a reward adapter over the frozen shared base + the head.

Outputs under ``output_dir`` (default ``runs/<name>/``)::

    config.yaml, metrics.jsonl, tensorboard/, checkpoints/ (Orbax, resumed)
    eval_rewards.jsonl   per eval pair: index (row of the source), r_chosen, r_rejected
    stage/               stage checkpoint: params/ (base), lora/ (reward adapter), reward_head/,
                         reward_stats.json (mean / std of rewards over the eval split, for PPO's
                         normalisation), tokenizer/, spec.json, stage.json
    export/hf/           *ForSequenceClassification (num_labels = 1) + tokenizer (decoder-only families)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf import data, losses, models, reward_model, sharding
from jaxrlhf import lora as lora_lib
from jaxrlhf import train as train_lib
from jaxrlhf.models import heads
from jaxrlhf.pairs import PairShape, pair_shape
from jaxrlhf.stages import common, runner
from jaxrlhf.stages.common import CheckpointConfig, LoopConfig, ModelConfig, TokenizerConfig

logger = logging.getLogger("jaxrlhf.rm")

__all__ = [
    "RMConfig",
    "RMExportConfig",
    "RMResult",
    "RMTrainConfig",
    "evaluate_rewards",
    "make_loss_fn",
    "pair_metrics",
    "run",
]


@dataclasses.dataclass(frozen=True)
class RMTrainConfig(LoopConfig):
    """Loop settings (:class:`~jaxrlhf.stages.common.LoopConfig`) + the loss's: ``use_margin`` subtracts
    the data's ``margin`` column inside the sigmoid; ``center_coef``: TRL's ``center_rewards_coefficient``."""

    center_coef: float = 0.0
    use_margin: bool = True


@dataclasses.dataclass(frozen=True)
class RMExportConfig:
    """``hf``: write ``export/hf`` as a HF ``*ForSequenceClassification`` model (decoder-only families)."""

    hf: bool = True


@dataclasses.dataclass(frozen=True)
class RMConfig:
    data: data.DataConfig
    name: str = "rm"
    output_dir: str | None = None
    model: ModelConfig = ModelConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    optim: train_lib.OptimConfig = train_lib.OptimConfig()
    lora: lora_lib.LoraConfig | None = None
    train: RMTrainConfig = RMTrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    export: RMExportConfig = RMExportConfig()


class RMResult(NamedTuple):
    run_dir: str
    stage_dir: str
    train_metrics: dict
    eval_metrics: dict  # loss, accuracy, margin, reward_mean, reward_std over the eval split
    first_eval: dict  # before training (fresh runs only)
    reward_stats: dict  # what reward_stats.json holds


def _forward_kwargs(spec, model_cfg: ModelConfig, lcfg, rng) -> dict:
    use_dropout = lcfg is not None and lcfg.dropout > 0
    return dict(
        lora_config=lcfg,
        compute_dtype=common.dtype_of(model_cfg.compute_dtype),
        remat=model_cfg.remat,
        attention_impl=model_cfg.attention_impl,
        dropout_rng=rng if use_dropout else None,
        max_segments=1,  # right-padded rows: one segment each (fused attention: length, no dense mask)
    )


def _split(trainable, frozen, lcfg):
    """``(base params, adapters or None, head)`` of a train state's (params, frozen)."""
    if lcfg is not None:
        return frozen, trainable["lora"], trainable["head"]
    return trainable["params"], None, trainable["head"]


def make_loss_fn(spec: models.ModelSpec, cfg: RMConfig, *, shape: PairShape | None = None):
    """``loss_fn(trainable, frozen, batch, rng) -> (loss, metrics)``; ``trainable`` = ``{"params" | "lora",
    "head"}``. Metrics carry ``weight`` = pairs in the batch, so accumulation averages over pairs.
    ``shape``: decoder-only shared-prompt rows (``reward_model.score_pairs``; the stage passes
    :func:`jaxrlhf.pairs.pair_shape` of its data)."""
    t = cfg.train

    def loss_fn(trainable, frozen, batch, rng):
        base, adapters, head = _split(trainable, frozen, cfg.lora)
        if not t.center_coef:
            # r_c - r_r does not depend on the bias: keep its gradient exactly 0 (Adam would amplify rounding
            # noise into a random walk), so the exported bias-free HF score layer stays exact
            head = {"kernel": head["kernel"], "bias": jax.lax.stop_gradient(head["bias"])}
        kw = _forward_kwargs(spec, cfg.model, cfg.lora, rng)
        r_c, r_r = reward_model.score_pairs(spec, base, head, batch, lora=adapters, shape=shape, **kw)
        margin = batch["margin"] if t.use_margin else None
        loss, m = losses.reward_loss(r_c, r_r, margin=margin, center_coef=t.center_coef)
        keep = ("accuracy", "margin", "reward_mean", "reward_std")
        return loss, {**{k: m[k] for k in keep}, "weight": jnp.asarray(r_c.shape[0], jnp.float32)}

    return loss_fn


def _eval_batches(ds, batch_size: int, max_batches: int | None):
    """All eval pairs in order, in batches of ``batch_size`` (the last one padded by repeating row 0);
    yields ``(numpy batch, number of real rows, source indices)``."""
    n = len(ds.data)
    for b, start in enumerate(range(0, n, batch_size)):
        if max_batches is not None and b >= max_batches:
            return
        rows = ds.data[start : start + batch_size]
        examples = [dict(zip(rows, vals, strict=True)) for vals in zip(*rows.values(), strict=True)]
        real = len(examples)
        examples += [examples[0]] * (batch_size - real)
        yield data.collate(examples, ds), real, list(rows["index"])


def evaluate_rewards(
    score_fn, trainable, frozen, ds, batch_size: int, max_batches, mesh, *, center_coef=0.0, use_margin=True
):
    """Score every eval pair once; exact metrics over the whole split and the per-pair rewards. Every
    process holds each eval batch whole; the scores are gathered back on every process."""
    r_c, r_r, margins, index = [], [], [], []
    with sharding.use_mesh(mesh):
        for batch, real, idx in _eval_batches(ds, batch_size, max_batches):
            c, r = runner.host_array(score_fn(trainable, frozen, runner.global_from_full(batch, mesh)))
            r_c.append(np.asarray(c[:real]))
            r_r.append(np.asarray(r[:real]))
            margins.append(batch["margin"][:real])
            index.extend(int(i) for i in idx)
    r_c, r_r, margins = (np.concatenate(x) for x in (r_c, r_r, margins))
    metrics = pair_metrics(r_c, r_r, margins, center_coef=center_coef, use_margin=use_margin)
    return metrics, {"index": index, "r_chosen": r_c, "r_rejected": r_r}


def pair_metrics(
    r_chosen: np.ndarray, r_rejected: np.ndarray, margins: np.ndarray, *, center_coef=0.0, use_margin=True
) -> dict[str, float]:
    """The RM eval's metrics of scored pairs ``[N]``: the loss of :func:`jaxrlhf.losses.reward_loss`,
    ``accuracy`` (fraction with ``r_chosen > r_rejected``), ``margin`` (mean ``r_chosen - r_rejected``),
    ``reward_mean`` / ``reward_std`` and the chosen / rejected means."""
    loss, m = losses.reward_loss(
        jnp.asarray(r_chosen),
        jnp.asarray(r_rejected),
        margin=jnp.asarray(margins) if use_margin else None,
        center_coef=center_coef,
    )
    return {"loss": float(loss), **{k: float(v) for k, v in m.items() if k != "bt_loss"}}


def _trainable_axes(spec, adapters, lcfg):
    axes = models.param_axes(spec)
    if lcfg is not None:
        return {"lora": lora_lib.param_axes(axes, adapters), "head": heads.head_axes()}, axes
    return {"params": axes, "head": heads.head_axes()}, None


def trainable_params(r: runner.Run, config: RMConfig) -> tuple[dict, dict | None, dict]:
    """``(trainable, frozen, trainable_axes)`` of the RM stage from the started run ``r`` (its params are
    handed over: ``r.params`` is None after): full FT ``{"params", "head"}`` with no frozen part; LoRA
    ``{"lora", "head"}`` (f32 adapters and head) over the frozen base."""
    spec, lcfg = r.spec, config.lora
    dtype = common.dtype_of(config.model.dtype)
    head = heads.init_head(spec, r.fold(4), dtype=common.ADAPTER_DTYPE if lcfg is not None else dtype)
    if lcfg is not None:
        adapters = lora_lib.init(spec, r.params, lcfg, r.fold(1), dtype=common.ADAPTER_DTYPE)
        trainable, frozen = {"lora": adapters, "head": head}, r.params
    else:
        adapters, trainable, frozen = None, {"params": r.params, "head": head}, None
    r.params = None
    return trainable, frozen, _trainable_axes(spec, adapters, lcfg)[0]


def run(config: RMConfig) -> RMResult:
    """Train and evaluate the reward model; resumes from ``checkpoints/`` when present."""
    r = runner.start(config, "rm")
    spec, lcfg = r.spec, config.lora
    dcfg = common.data_config(config.data, r.out)
    ds = runner.build_dataset(r, dcfg, "preference")
    if ds.eval is None:
        logger.warning("no eval split (set data.eval_fraction or data.eval_split): stats from train pairs")
    stats_ds = ds.eval if ds.eval is not None else ds
    shape = None if spec.is_encoder_decoder else pair_shape(ds)
    if shape is not None:
        logger.info("shared-prompt pair rows: length %d, single rows up to %d", *shape)
    trainable, frozen, t_axes = trainable_params(r, config)

    @jax.jit
    def score_fn(trainable, frozen, batch):
        base, adapters_, head_ = _split(trainable, frozen, lcfg)
        kw = _forward_kwargs(spec, config.model, lcfg, None)
        return reward_model.score_pairs(spec, base, head_, batch, lora=adapters_, shape=shape, **kw)

    def run_eval(st, frozen_, split, max_batches):
        t = config.train
        return evaluate_rewards(
            score_fn, st.params, frozen_, split, dcfg.batch_size, max_batches, r.mesh,
            center_coef=t.center_coef, use_margin=t.use_margin,
        )  # fmt: skip

    eval_fn = None
    if ds.eval is not None:
        eval_fn = lambda st, fr: run_eval(st, fr, ds.eval, config.train.eval_batches)[0]  # noqa: E731
    job = runner.Training(
        make_loss_fn(spec, config, shape=shape), trainable, t_axes, frozen=frozen, eval_fn=eval_fn,
        tokens_fn=lambda b: 2 * int(np.prod(np.shape(b["chosen_input_ids"]))),
    )  # fmt: skip
    del trainable
    out = runner.train(r, job, ds)
    state, step = out.state, int(jax.device_get(out.state.step))
    if out.interrupted:
        runner.finish(out, step)
        return RMResult(r.out, "", out.train_metrics, out.eval_metrics, out.first_eval, {})

    # reward statistics over the eval split (train split if none), for PPO's reward normalisation
    stats_metrics, rewards = run_eval(state, frozen, stats_ds, None)
    both = np.concatenate([rewards["r_chosen"], rewards["r_rejected"]])
    stats = {
        "mean": float(both.mean()),
        "std": float(both.std()),
        "count": int(both.size),
        "split": "eval" if ds.eval is not None else "train",
        "accuracy": stats_metrics["accuracy"],
        "margin": stats_metrics["margin"],
    }
    if common.is_primary():
        with open(os.path.join(r.out, "eval_rewards.jsonl"), "w") as f:
            for i, c, rr in zip(rewards["index"], rewards["r_chosen"], rewards["r_rejected"], strict=True):
                f.write(json.dumps({"index": i, "r_chosen": float(c), "r_rejected": float(rr)}) + "\n")
    base, adapters, head = _split(state.params, frozen, lcfg)
    stage_dir = runner.save(
        r,
        base=base,
        adapters=adapters,
        lora_config=lcfg,
        info={"step": step, "eval": out.eval_metrics},
        extras={"reward_head": head},
        json_extras={"reward_stats": stats},
    )
    if config.export.hf:
        # every process takes part in the gathers; process 0 writes
        merged = runner.host_array(base if adapters is None else lora_lib.merge(base, adapters, lcfg))
        head_np = runner.host_array(head)
        if common.is_primary():
            _export(spec, merged, head_np, r.tokenizer, os.path.join(r.out, "export", "hf"))
    runner.finish(out, step, {f"reward_stats/{k}": v for k, v in stats.items() if k != "split"})
    logger.info("reward stats: %s", stats)
    return RMResult(r.out, stage_dir, out.train_metrics, out.eval_metrics, out.first_eval, stats)


def _export(spec, merged, head, tokenizer, hf_dir: str) -> None:
    """HF ``*ForSequenceClassification`` + tokenizer. HF pools at the last token that is not ``pad_token_id``;
    when the tokenizer pads with EOS (which ends every scored sequence) the export pads with UNK instead, so
    HF scores the same EOS token that jaxrlhf does."""
    if spec.model_type not in reward_model.SEQ_CLS_ARCHITECTURES:
        logger.warning("no HF sequence-classification export for %s reward models", spec.model_type)
        return
    pad = tokenizer.pad_token_id
    if pad in spec.eos_token_ids or pad == tokenizer.eos_token_id:
        if tokenizer.unk_token_id is not None and tokenizer.hf is not None:
            tokenizer.hf.pad_token = tokenizer.unk_token
            pad = tokenizer.unk_token_id
            logger.info("HF export pads with UNK (id %d): EOS is a scored token, not padding", pad)
        else:
            logger.warning(
                "the tokenizer pads with EOS: HF's exported classifier will pool before a final EOS token"
            )
    reward_model.export_hf(spec, merged, head, hf_dir, pad_token_id=pad)
    tokenizer.save_pretrained(hf_dir)
    logger.info("HF export: %s", hf_dir)
