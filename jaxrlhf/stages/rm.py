"""Reward modelling: ``jaxrlhf rm --config FILE.yaml --set key=value ...``.

A backbone (from an SFT stage checkpoint, a HF directory, or a fresh ``model.spec``) plus a scalar head
(:mod:`jaxrlhf.models.heads`) learns from comparisons (``prompt``/``chosen``/``rejected`` rows, strings or
chat messages, optional ``margin``) with the Bradley-Terry loss (:func:`jaxrlhf.losses.reward_loss`):

    r = head(hidden at the last token of prompt + response)
    loss = mean -log sigmoid(r_chosen - r_rejected - margin) + center_coef * mean (r_chosen + r_rejected)^2

Chosen and rejected rows are scored in one forward pass (concatenated along the batch). Full fine-tuning
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
from jaxrlhf.config import dump_yaml, to_dict
from jaxrlhf.models import heads
from jaxrlhf.stages import common
from jaxrlhf.stages.common import CheckpointConfig, MeshConfig, ModelConfig, TokenizerConfig

logger = logging.getLogger("jaxrlhf.rm")

__all__ = [
    "RMConfig",
    "RMExportConfig",
    "RMResult",
    "RMTrainConfig",
    "evaluate_rewards",
    "make_loss_fn",
    "run",
]


@dataclasses.dataclass(frozen=True)
class RMTrainConfig:
    """Loop settings; ``eval_batches``: null = the whole eval split. ``use_margin``: subtract the data's
    ``margin`` column inside the sigmoid; ``center_coef``: TRL's ``center_rewards_coefficient``."""

    eval_every: int = 100
    eval_batches: int | None = None
    log_every: int = 10
    seed: int = 0
    center_coef: float = 0.0
    use_margin: bool = True
    mesh: MeshConfig = MeshConfig()
    tensorboard: bool = True
    progress: bool = True


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
    )


def _split(trainable, frozen, lcfg):
    """``(base params, adapters or None, head)`` of a train state's (params, frozen)."""
    if lcfg is not None:
        return frozen, trainable["lora"], trainable["head"]
    return trainable["params"], None, trainable["head"]


def make_loss_fn(spec: models.ModelSpec, cfg: RMConfig):
    """``loss_fn(trainable, frozen, batch, rng) -> (loss, metrics)``; ``trainable`` = ``{"params" | "lora",
    "head"}``. Metrics carry ``weight`` = pairs in the batch, so accumulation averages over pairs."""
    t = cfg.train

    def loss_fn(trainable, frozen, batch, rng):
        base, adapters, head = _split(trainable, frozen, cfg.lora)
        if not t.center_coef:
            # r_c - r_r does not depend on the bias: keep its gradient exactly 0 (Adam would amplify rounding
            # noise into a random walk), so the exported bias-free HF score layer stays exact
            head = {"kernel": head["kernel"], "bias": jax.lax.stop_gradient(head["bias"])}
        kw = _forward_kwargs(spec, cfg.model, cfg.lora, rng)
        r_c, r_r = reward_model.score_pairs(spec, base, head, batch, lora=adapters, **kw)
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


def evaluate_rewards(score_fn, trainable, frozen, ds, batch_size: int, max_batches, mesh, *, center_coef=0.0):
    """Score every eval pair once; exact metrics over the whole split and the per-pair rewards."""
    r_c, r_r, margins, index = [], [], [], []
    with sharding.use_mesh(mesh):
        for batch, real, idx in _eval_batches(ds, batch_size, max_batches):
            c, r = jax.device_get(score_fn(trainable, frozen, data.to_global(batch, mesh)))
            r_c.append(np.asarray(c[:real]))
            r_r.append(np.asarray(r[:real]))
            margins.append(batch["margin"][:real])
            index.extend(int(i) for i in idx)
    r_c, r_r, margins = (np.concatenate(x) for x in (r_c, r_r, margins))
    loss, m = losses.reward_loss(
        jnp.asarray(r_c), jnp.asarray(r_r), margin=jnp.asarray(margins), center_coef=center_coef
    )
    metrics = {"loss": float(loss), **{k: float(v) for k, v in m.items() if k != "bt_loss"}}
    return metrics, {"index": index, "r_chosen": r_c, "r_rejected": r_r}


def _trainable_axes(spec, adapters, lcfg):
    axes = models.param_axes(spec)
    if lcfg is not None:
        return {"lora": lora_lib.param_axes(axes, adapters), "head": heads.head_axes()}, axes
    return {"params": axes, "head": heads.head_axes()}, None


class _Batches:
    """Loader -> global batches (``[k, B/k, ...]`` micro-batches under gradient accumulation)."""

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
        batch = {n: np.reshape(x, (self.k, -1) + x.shape[1:]) for n, x in batch.items()}
        sh = train_lib.batch_shardings(batch, self.mesh, self.k)
        return jax.tree.map(jax.device_put, batch, sh)


def run(config: RMConfig) -> RMResult:
    """Train and evaluate the reward model; resumes from ``checkpoints/`` when present."""
    out = common.run_dir(config.name, config.output_dir)
    if jax.process_index() == 0:
        dump_yaml(config, os.path.join(out, "config.yaml"))
    mesh = common.make_mesh(config.train.mesh)
    model_path = common.resolve_path(config.model.path)
    tokenizer = common.load_tokenizer(config.tokenizer, model_path, out)
    rng = jax.random.PRNGKey(config.train.seed)
    spec, params = common.load_model(config.model, model_path, tokenizer, mesh, rng)
    dtype = common.dtype_of(config.model.dtype)
    logger.info("reward model on %s (%.2fM params)", spec.model_type, models.count_params(spec) / 1e6)

    dcfg = common.data_config(config.data, out)
    ds = data.build_dataset(dcfg, tokenizer, kind="preference")
    if ds.eval is None:
        logger.warning("no eval split (set data.eval_fraction or data.eval_split): stats from train pairs")
    stats_ds = ds.eval if ds.eval is not None else ds

    lcfg, optim = config.lora, config.optim
    head = heads.init_head(spec, jax.random.fold_in(rng, 4), dtype=dtype)
    opt = train_lib.make_optimizer(optim)
    if lcfg is not None:
        adapters = lora_lib.init(spec, params, lcfg, jax.random.fold_in(rng, 1), dtype=dtype)
        trainable, frozen = {"lora": adapters, "head": head}, params
    else:
        adapters, trainable, frozen = None, {"params": params, "head": head}, None
    t_axes, f_axes = _trainable_axes(spec, adapters, lcfg)
    state, shard = train_lib.init_train_state(
        trainable,
        opt,
        jax.random.fold_in(rng, 2),
        frozen=frozen,
        mesh=mesh,
        params_axes=t_axes,
        frozen_axes=f_axes,
    )
    del params, trainable, frozen
    loss_fn = make_loss_fn(spec, config)
    step_fn, loader, mgr, state = common.prepare_training(
        loss_fn, opt, optim, shard, mesh, ds, dcfg, config.checkpoint, out, state
    )

    @jax.jit
    def score_fn(trainable, frozen, batch):
        base, adapters_, head_ = _split(trainable, frozen, lcfg)
        kw = _forward_kwargs(spec, config.model, lcfg, None)
        return reward_model.score_pairs(spec, base, head_, batch, lora=adapters_, **kw)

    eval_bs = dcfg.batch_size

    def run_eval(st, split=stats_ds, max_batches=config.train.eval_batches):
        return evaluate_rewards(
            score_fn,
            st.params,
            st.frozen,
            split,
            eval_bs,
            max_batches,
            mesh,
            center_coef=config.train.center_coef,
        )

    eval_fn = (lambda st: run_eval(st, ds.eval)[0]) if ds.eval is not None else None
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
    flops = train_lib.flops_per_token(
        models.count_params(spec), spec.num_layers, dcfg.max_length, spec.hidden_size
    )
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
        tokens_fn=lambda b: 2 * int(np.prod(np.shape(b["chosen_input_ids"]))),
        peak_flops=train_lib.peak_flops(jax.devices()[0].device_kind),
        progress=config.train.progress,
    )
    mgr.close()
    state = result.state
    step = int(jax.device_get(state.step))
    if result.interrupted:
        logger.warning("interrupted at step %d: checkpoint saved, rerun the same command to resume", step)
        if writer is not None:
            writer.close()
        return RMResult(out, "", result.last_metrics, result.eval_metrics, first_eval, {})

    # reward statistics over the eval split (train split if none), for PPO's reward normalisation
    stats_metrics, rewards = run_eval(state, stats_ds, None)
    both = np.concatenate([rewards["r_chosen"], rewards["r_rejected"]])
    stats = {
        "mean": float(both.mean()),
        "std": float(both.std()),
        "count": int(both.size),
        "split": "eval" if ds.eval is not None else "train",
        "accuracy": stats_metrics["accuracy"],
        "margin": stats_metrics["margin"],
    }
    if jax.process_index() == 0:
        with open(os.path.join(out, "eval_rewards.jsonl"), "w") as f:
            for i, c, r in zip(rewards["index"], rewards["r_chosen"], rewards["r_rejected"], strict=True):
                f.write(json.dumps({"index": i, "r_chosen": float(c), "r_rejected": float(r)}) + "\n")
    base, adapters, head = _split(state.params, state.frozen, lcfg)
    head = jax.device_get(head)
    stage_dir = common.save_outputs(
        out,
        "rm",
        spec,
        base,
        adapters,
        lcfg,
        tokenizer,
        common.ExportConfig(hf=False, peft=False),
        model_path,
        info={"step": step, "eval": result.eval_metrics, "config": to_dict(config)},
        extras={"reward_head": head},
        json_extras={"reward_stats": stats},
    )
    if config.export.hf and jax.process_index() == 0:
        _export(spec, base, adapters, lcfg, head, tokenizer, os.path.join(out, "export", "hf"))
    if writer is not None:
        writer.write(step, {f"reward_stats/{k}": v for k, v in stats.items() if k != "split"})
        writer.close()
    logger.info("train: %s; eval: %s; reward stats: %s", result.last_metrics, result.eval_metrics, stats)
    return RMResult(out, stage_dir, result.last_metrics, result.eval_metrics, first_eval, stats)


def _export(spec, base, adapters, lcfg, head, tokenizer, hf_dir: str) -> None:
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
    merged = base if adapters is None else lora_lib.merge(base, adapters, lcfg)
    reward_model.export_hf(spec, merged, head, hf_dir, pad_token_id=pad)
    tokenizer.save_pretrained(hf_dir)
    logger.info("HF export: %s", hf_dir)
