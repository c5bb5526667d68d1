"""Direct preference optimisation: ``jaxrlhf dpo --config FILE.yaml --set key=value ...``.

A policy (from an SFT stage checkpoint or a HF directory; full fine-tuning or LoRA) learns from comparisons
(any preference rows :func:`jaxrlhf.data.formats.split_preference` reads) with the losses of
:func:`jaxrlhf.losses.dpo_loss` (``train.loss_type``: sigmoid / cDPO, ipo, hinge, robust, simpo; RPO via
``train.rpo_alpha``). Per pair, with completion log-probs summed over the response tokens (and their EOS):

    log pi(y|x) = sum_t loss_mask[t] log softmax(logits[t - 1])[ids[t]]        (decoder-only)
    log pi(y|x) = sum_t loss_mask[t] log softmax(decoder logits[t])[labels[t]]  (T5: prompt + EOS -> encoder)

Chosen and rejected rows go through ONE forward pass. Decoder-only models share the prompt: each pair is
one row ``[prompt | chosen response | rejected response]`` (:func:`pack_pairs`, ``models.PairLayout``) in
which the rejected response attends to the prompt and to itself only, so the prompt's projections and MLP
run once per pair (the log-probs are those of the two separate rows; the row length comes from the data,
:func:`pair_shape`). T5 concatenates the pairs along the batch (``[2B, T]``; the encoder reads the prompt).
The reference (``train.reference``) is the starting policy:

- ``precompute`` (default): one jitted pass over the tokenized train / eval pairs before training stores
  ``ref_chosen_logps`` / ``ref_rejected_logps`` as columns of the dataset (cached in
  ``<run dir>/reference/``, keyed by data and weights); no reference model is held while training;
- ``on_the_fly``: the base with the adapters left out (LoRA: no extra memory), or a frozen copy of the
  starting weights (full fine-tuning), run in the same step.

Outputs under ``output_dir`` (default ``runs/<name>/``): config.yaml, run.json, metrics.jsonl (train and
``eval/`` held-out pair metrics: loss, rewards/chosen|rejected|margins|accuracies, logps/chosen|rejected),
tensorboard/, checkpoints/ (resumed exactly), reference/, stage/ (loadable by ``jaxrlhf generate
--checkpoint``), export/hf/ (merged) and export/peft/ (LoRA), samples.jsonl (scored by ``samples.rule``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf import data, losses, models, sharding
from jaxrlhf import lora as lora_lib
from jaxrlhf import train as train_lib
from jaxrlhf.generation import SamplingConfig
from jaxrlhf.losses._dpo import REFERENCE_FREE
from jaxrlhf.pairs import PairShape, forward_pairs, pack_pairs, pair_shape
from jaxrlhf.stages import common, runner
from jaxrlhf.stages.common import CheckpointConfig, ExportConfig, LoopConfig, ModelConfig, TokenizerConfig
from jaxrlhf.stages.samples import SampleConfig, write_samples

logger = logging.getLogger("jaxrlhf.dpo")

__all__ = [
    "DPOConfig",
    "DPOResult",
    "DPOTrainConfig",
    "PairShape",
    "make_loss_fn",
    "pack_pairs",
    "pair_logps",
    "pair_shape",
    "precompute_reference",
    "run",
]

REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


@dataclasses.dataclass(frozen=True)
class DPOTrainConfig(LoopConfig):
    """DPO hyper-parameters (see :func:`jaxrlhf.losses.dpo_loss`) + the loop settings
    (:class:`~jaxrlhf.stages.common.LoopConfig`).

    ``reference``: ``precompute`` or ``on_the_fly`` (module docstring; simpo needs none);
    ``reference_batch_size``: pairs per batch of the precompute pass (null = ``data.batch_size``);
    ``eval_batches``: null = every held-out pair.
    """

    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    rpo_alpha: float = 0.0
    reference: Literal["precompute", "on_the_fly"] = "precompute"
    reference_batch_size: int | None = None

    def __post_init__(self):
        if self.loss_type not in losses.DPO_LOSS_TYPES:
            raise ValueError(
                f"train.loss_type must be one of {losses.DPO_LOSS_TYPES}, got {self.loss_type!r}"
            )
        if self.reference not in ("precompute", "on_the_fly"):
            raise ValueError(f"train.reference must be 'precompute' or 'on_the_fly', got {self.reference!r}")
        if self.beta <= 0:
            raise ValueError(f"train.beta must be > 0, got {self.beta}")


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    data: data.DataConfig
    name: str = "dpo"
    output_dir: str | None = None
    model: ModelConfig = ModelConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    optim: train_lib.OptimConfig = train_lib.OptimConfig(lr=1e-6, schedule="linear", warmup_steps=10)
    lora: lora_lib.LoraConfig | None = None
    train: DPOTrainConfig = DPOTrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    export: ExportConfig = ExportConfig()
    samples: SampleConfig = SampleConfig(sampling=SamplingConfig(max_new_tokens=32, temperature=1.0))


class DPOResult(NamedTuple):
    run_dir: str
    stage_dir: str
    train_metrics: dict  # last logged train metrics
    eval_metrics: dict  # last held-out metrics (loss, rewards/..., logps/...)
    first_eval: dict  # before training (fresh runs only; else {})
    samples: dict  # summary of the sample generations (e.g. rule_score)


# ------------------------------------------------------------------------------------------- log-probs
def _seq2seq_view(ids, attn, loss_mask, *, eos: int, pad: int, start: int, prefix_len: int):
    """Decoder-only pair rows ``[prefix, prompt, completion]`` -> the seq2seq format's T5 tensors (all
    ``[N, T]``): encoder ids ``prompt + EOS`` (the tokenizer's ``prefix_len`` BOS-like tokens dropped),
    decoder inputs ``[start] + labels[:-1]``, labels = the completion (with its EOS), and their masks."""
    t = jnp.arange(ids.shape[1])[None, :]
    p = jnp.sum(attn * (1 - loss_mask), axis=1, keepdims=True) - prefix_len  # prompt length
    c = jnp.sum(loss_mask, axis=1, keepdims=True)  # completion length

    def shifted(k):  # ids[:, t + k] (clipped at the end)
        return jnp.take_along_axis(ids, jnp.minimum(t + k, ids.shape[1] - 1), axis=1)

    enc = jnp.where(t < p, shifted(prefix_len), jnp.where(t == p, eos, pad))
    dec_mask = (t < c).astype(jnp.int32)
    labels = jnp.where(dec_mask > 0, shifted(p + prefix_len), pad)
    dec_in = jnp.concatenate([jnp.full_like(labels[:, :1], start), labels[:, :-1]], axis=1)
    return enc, (t <= p).astype(jnp.int32), dec_in, dec_mask, labels


def _packed_pair_logps(spec, params, batch, shape: PairShape, **forward_kwargs):
    """``pair_logps`` of decoder-only pairs through :func:`pack_pairs` rows (see there)."""
    ids, loss, layout, out = forward_pairs(spec, params, batch, shape, **forward_kwargs)
    cdt = forward_kwargs.get("compute_dtype")
    vm = models.lm_head_vocab_major(spec)
    h, kernel = models.lm_head_operands(spec, params, out.hidden, compute_dtype=cdt, vocab_major=vm)
    targets, tmask = losses.next_token_targets(ids, loss)
    t = jnp.arange(ids.shape[1])[None, :]
    a = layout.split[:, None]
    tmask = jnp.where(t == a - 1, 0, tmask)  # chosen's last slot does not predict the rejected response
    lp = losses.chunked_token_logprobs(h, kernel, targets, mask=tmask, logits_dtype=cdt, vocab_major=vm)
    lp = jnp.where(tmask > 0, lp, 0.0)
    # rejected's token at s (its first after the shared prompt) is predicted by the prompt's last slot
    s = layout.shared
    r_ids, r_loss = batch["rejected_input_ids"], batch["rejected_loss_mask"]
    at = jnp.clip(s, 0, r_ids.shape[1] - 1)[:, None]
    first = (s >= 1) & (jnp.take_along_axis(r_loss, at, axis=1)[:, 0] > 0)
    h_prev = jnp.take_along_axis(h, jnp.maximum(s - 1, 0)[:, None, None], axis=1)  # [B, 1, E]
    lp_first = losses.chunked_token_logprobs(
        h_prev,
        kernel,
        jnp.take_along_axis(r_ids, at, axis=1),
        mask=first[:, None],
        logits_dtype=cdt,
        vocab_major=vm,
    )[:, 0]
    chosen = jnp.sum(jnp.where(t < a - 1, lp, 0.0), axis=1)
    rejected = jnp.sum(jnp.where(t >= a, lp, 0.0), axis=1) + jnp.where(first, lp_first, 0.0)
    counts = [jnp.sum(batch[f"{side}_loss_mask"][:, 1:], axis=1) for side in ("chosen", "rejected")]
    return jnp.concatenate([chosen, rejected]), jnp.concatenate(counts).astype(jnp.float32)


def pair_logps(
    spec: models.ModelSpec,
    params: dict,
    batch: dict,
    *,
    prefix_len: int = 0,
    shape: PairShape | None = None,
    **forward_kwargs,
):
    """``(logps [2B], counts [2B])``: summed completion log-probs and completion token counts of the chosen
    rows then the rejected rows of a preference batch, from one forward pass.

    Decoder-only with ``shape`` (:func:`pair_shape`): the shared-prompt rows of :func:`pack_pairs` (``[B,
    L]``); without: chosen and rejected rows concatenated (``[2B, T]``). Both give the same log-probs. T5
    reads the rows as the seq2seq format would (``prefix_len``: tokens the tokenizer puts before every text,
    ``len(tokenizer.prefix_ids)``, which the encoder does not see)."""
    if shape is not None and not spec.is_encoder_decoder:
        return _packed_pair_logps(spec, params, batch, shape, **forward_kwargs)
    cat = {
        k: jnp.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]], axis=0)
        for k in ("input_ids", "attention_mask", "loss_mask")
    }
    ids, attn, mask = cat["input_ids"], cat["attention_mask"], cat["loss_mask"]
    if spec.is_encoder_decoder:
        pad = spec.pad_token_id if spec.pad_token_id is not None else 0
        start = spec.decoder_start_token_id if spec.decoder_start_token_id is not None else pad
        enc, enc_mask, dec_in, dec_mask, labels = _seq2seq_view(
            ids, attn, mask, eos=spec.eos_token_ids[0], pad=pad, start=start, prefix_len=prefix_len
        )
        out = models.forward(
            spec, params, enc, enc_mask, decoder_input_ids=dec_in, decoder_attention_mask=dec_mask,
            **forward_kwargs,
        )  # fmt: skip
        lp, tmask = losses.token_logprobs(out.logits, labels), dec_mask
    else:
        # the LM head + log-softmax in sequence chunks: no [2B, T, V] f32 logits (forward's unused logits
        # are dead code under jit); position t predicts token t + 1, the last position predicts nothing
        out = models.forward(spec, params, ids, attn, **forward_kwargs)
        cdt = forward_kwargs.get("compute_dtype")
        vm = models.lm_head_vocab_major(spec)
        h, kernel = models.lm_head_operands(spec, params, out.hidden, compute_dtype=cdt, vocab_major=vm)
        targets, tmask = losses.next_token_targets(ids, mask)
        # only the completion positions go through the head (logits in the compute dtype, f32 softmax)
        lp = losses.chunked_token_logprobs(h, kernel, targets, mask=tmask, logits_dtype=cdt, vocab_major=vm)
    tmask = tmask.astype(jnp.float32)
    return jnp.sum(jnp.where(tmask > 0, lp, 0.0), axis=1), jnp.sum(tmask, axis=1)


def _forward_kwargs(cfg: DPOConfig, lora_config, adapters, rng) -> dict:
    use_dropout = adapters is not None and lora_config is not None and lora_config.dropout > 0
    return dict(
        lora=adapters,
        lora_config=lora_config if adapters is not None else None,
        compute_dtype=common.dtype_of(cfg.model.compute_dtype),
        remat=cfg.model.remat,
        attention_impl=cfg.model.attention_impl,
        dropout_rng=rng if use_dropout else None,
        max_segments=1,  # right-padded rows: one segment each (fused attention: length, no dense mask)
    )


def make_loss_fn(
    spec: models.ModelSpec,
    cfg: DPOConfig,
    lora_config: lora_lib.LoraConfig | None,
    *,
    prefix_len: int = 0,
    shape: PairShape | None = None,
):
    """``loss_fn(trainable, frozen, batch, rng) -> (loss, metrics)`` for the train step.

    LoRA: ``trainable`` = adapters, ``frozen`` = the base (also the on-the-fly reference). Full fine-tuning:
    ``trainable`` = params, ``frozen`` = the reference weights (on the fly) or None (precomputed: the batch
    carries ``ref_chosen_logps`` / ``ref_rejected_logps``). An optional ``pair_mask`` [B] marks padding
    pairs of an eval batch. Metrics carry ``weight`` = real pairs in the batch. ``prefix_len`` (T5 only),
    ``shape`` (decoder-only shared-prompt rows; the stage passes :func:`pair_shape` of its data): see
    :func:`pair_logps`.
    """
    t = cfg.train
    reference_free = t.loss_type in REFERENCE_FREE

    def loss_fn(trainable, frozen, batch, rng):
        base, adapters = (frozen, trainable) if lora_config is not None else (trainable, None)
        kw = _forward_kwargs(cfg, lora_config, adapters, rng)
        logps, counts = pair_logps(spec, base, batch, prefix_len=prefix_len, shape=shape, **kw)
        b = batch["chosen_input_ids"].shape[0]
        ref_c = ref_r = None
        if not reference_free and REF_COLUMNS[0] in batch:
            ref_c, ref_r = batch[REF_COLUMNS[0]], batch[REF_COLUMNS[1]]
        elif not reference_free:
            if frozen is None:
                raise ValueError("DPO loss: no reference log-probs in the batch and no reference weights")
            ref, _ = pair_logps(
                spec,
                frozen,
                batch,
                prefix_len=prefix_len,
                shape=shape,
                **_forward_kwargs(cfg, None, None, None),
            )
            ref = jax.lax.stop_gradient(ref)
            ref_c, ref_r = ref[:b], ref[b:]
        pair_mask = batch.get("pair_mask")
        loss, m = losses.dpo_loss(
            logps[:b], logps[b:], ref_c, ref_r, beta=t.beta, loss_type=t.loss_type,
            label_smoothing=t.label_smoothing, chosen_length=counts[:b], rejected_length=counts[b:],
            simpo_gamma=t.simpo_gamma, rpo_alpha=t.rpo_alpha, mask=pair_mask,
        )  # fmt: skip
        weight = jnp.sum(pair_mask.astype(jnp.float32)) if pair_mask is not None else jnp.float32(b)
        return loss, {**m, "weight": weight}

    return loss_fn


# ------------------------------------------------------------------------------------------- reference
def _padded_batches(ds, batch_size: int):
    """Every pair of ``ds`` in order, ``batch_size`` at a time (the last batch padded by repeating its first
    row); yields ``(numpy batch with pair_mask, number of real rows)``."""
    n = len(ds.data)
    for start in range(0, n, batch_size):
        rows = ds.data[start : start + batch_size]
        examples = [dict(zip(rows, vals, strict=True)) for vals in zip(*rows.values(), strict=True)]
        real = len(examples)
        examples += [examples[0]] * (batch_size - real)
        batch = data.collate(examples, ds)
        batch["pair_mask"] = (np.arange(batch_size) < real).astype(np.int32)
        for col in REF_COLUMNS:
            if col in examples[0]:
                batch[col] = np.asarray([e[col] for e in examples], np.float32)
        yield batch, real


def reference_logps(
    spec, params, ds, batch_size: int, mesh, *, prefix_len=0, compute_dtype=None, shape=None
) -> np.ndarray:
    """``[N, 2]`` (chosen, rejected) summed completion log-probs of every pair of ``ds`` under ``params``,
    one jitted pass in order (every process computes all rows)."""

    @jax.jit
    def fn(p, batch):
        logps, _ = pair_logps(spec, p, batch, prefix_len=prefix_len, shape=shape, compute_dtype=compute_dtype)
        b = batch["chosen_input_ids"].shape[0]
        return jnp.stack([logps[:b], logps[b:]], axis=1)

    out = []
    with sharding.use_mesh(mesh):
        for batch, real in _padded_batches(ds, batch_size):
            batch = {k: v for k, v in batch.items() if k not in REF_COLUMNS}
            out.append(runner.host_array(fn(params, runner.global_from_full(batch, mesh)))[:real])
    return np.concatenate(out, axis=0) if out else np.zeros((0, 2), np.float32)


def precompute_reference(
    spec,
    params,
    ds,
    batch_size: int,
    mesh,
    *,
    cache_dir=None,
    key="",
    prefix_len=0,
    compute_dtype=None,
    shape=None,
):
    """``ds`` (and ``ds.eval``) with the columns ``ref_chosen_logps`` / ``ref_rejected_logps`` added, from
    :func:`reference_logps`; with ``cache_dir`` the arrays are kept in ``<cache_dir>/<split>-<hash>.npy``
    (hash of ``key`` — the weights' identity — and the split's data fingerprint) and reused."""
    out = dataclasses.replace(ds)
    for split, part in (("train", ds), ("eval", ds.eval)):
        if part is None:
            continue
        fp = getattr(part.data, "_fingerprint", None)
        path = None
        if cache_dir is not None and fp is not None and key:
            digest = hashlib.sha256(json.dumps([key, fp, len(part.data)]).encode()).hexdigest()[:16]
            path = os.path.join(cache_dir, f"{split}-{digest}.npy")
        if path is not None and os.path.isfile(path):
            ref = np.load(path)
            logger.info("reference log-probs of the %s split from %s", split, path)
        else:
            ref = reference_logps(
                spec, params, part, batch_size, mesh, prefix_len=prefix_len, compute_dtype=compute_dtype,
                shape=shape,
            )  # fmt: skip
            if path is not None and jax.process_index() == 0:
                os.makedirs(cache_dir, exist_ok=True)
                np.save(path + ".tmp.npy", ref)
                os.replace(path + ".tmp.npy", path)
        cols = part.data.remove_columns([c for c in REF_COLUMNS if c in part.data.column_names])
        cols = cols.add_column(REF_COLUMNS[0], ref[:, 0].tolist()).add_column(
            REF_COLUMNS[1], ref[:, 1].tolist()
        )
        if split == "train":
            out.data = cols
        else:
            out.eval = dataclasses.replace(part, data=cols)
    return out


# ------------------------------------------------------------------------------------------------- run
def make_eval_fn(loss_fn, eval_ds, batch_size: int, max_batches: int | None, mesh):
    """``eval_fn(state, frozen)``: the loss-function metrics over every held-out pair (padded last batch,
    weighted by real pairs), or its first ``max_batches`` batches."""
    eval_step = train_lib.make_eval_step(loss_fn)
    bs = min(batch_size, len(eval_ds.data))

    def eval_fn(state, frozen):
        batches = (runner.global_from_full(b, mesh) for b, _ in _padded_batches(eval_ds, bs))
        if max_batches is not None:
            batches = (b for b, _ in zip(batches, range(max_batches), strict=False))
        with sharding.use_mesh(mesh):
            m = train_lib.evaluate(lambda s, b: eval_step(s, b, frozen), state, batches)
        m.pop("ppl", None)
        return m

    return eval_fn


def run(config: DPOConfig) -> DPOResult:
    """Run the DPO stage end to end (module docstring); resumes from ``checkpoints/`` when present."""
    r = runner.start(config, "dpo")
    spec, lcfg, t = r.spec, config.lora, config.train
    dcfg = common.data_config(config.data, r.out)
    ds = runner.build_dataset(r, dcfg, "preference")
    if ds.eval is None:
        logger.warning("no eval split (set data.eval_fraction or data.eval_split): no held-out metrics")
    compute_dtype = common.dtype_of(config.model.compute_dtype)
    needs_ref = t.loss_type not in REFERENCE_FREE
    precompute = needs_ref and t.reference == "precompute"
    prefix_len = len(r.tokenizer.prefix_ids)
    shape = None if spec.is_encoder_decoder else pair_shape(ds)
    if shape is not None:
        logger.info("shared-prompt pair rows: length %d, single rows up to %d", *shape)
    if precompute:  # from the starting weights, before any update (also on resume: same weights)
        key = json.dumps([r.base_ref, config.model.dtype, str(compute_dtype)]) if r.base_ref else ""
        ds = precompute_reference(
            spec, r.params, ds, t.reference_batch_size or dcfg.batch_size, r.mesh,
            cache_dir=os.path.join(r.out, "reference"), key=key, prefix_len=prefix_len,
            compute_dtype=compute_dtype, shape=shape,
        )  # fmt: skip
    axes = models.param_axes(spec)
    if lcfg is not None:
        adapters = lora_lib.init(spec, r.params, lcfg, r.fold(1), dtype=common.ADAPTER_DTYPE)
        trainable, t_axes, frozen = adapters, lora_lib.param_axes(axes, adapters), r.params
    else:
        frozen = jax.tree.map(lambda x: x.copy(), r.params) if needs_ref and not precompute else None
        trainable, t_axes = r.params, axes
    r.params = None  # the train state owns (and donates) the trainable weights now
    loss_fn = make_loss_fn(spec, config, lcfg, prefix_len=prefix_len, shape=shape)
    eval_fn = None
    if ds.eval is not None:
        eval_fn = make_eval_fn(loss_fn, ds.eval, dcfg.batch_size, t.eval_batches, r.mesh)
    job = runner.Training(
        loss_fn, trainable, t_axes, frozen=frozen, eval_fn=eval_fn,
        tokens_fn=lambda b: 2 * int(np.prod(np.shape(b["chosen_input_ids"]))),
    )  # fmt: skip
    del trainable
    out = runner.train(r, job, ds)
    step = int(jax.device_get(out.state.step))
    if out.interrupted:
        runner.finish(out, step)
        return DPOResult(r.out, "", out.train_metrics, out.eval_metrics, out.first_eval, {})
    base, adapters = (frozen, out.state.params) if lcfg is not None else (out.state.params, None)
    stage_dir = runner.save(
        r, base=base, adapters=adapters, lora_config=lcfg, info={"step": step, "eval": out.eval_metrics},
        export=config.export,
    )  # fmt: skip
    summary = write_samples(
        config.samples, r.out, spec, base, adapters, lcfg, r.tokenizer, dcfg, r.mesh, r.fold(3),
        compute_dtype=compute_dtype,
    )  # fmt: skip
    runner.finish(out, step, {f"samples/{k}": v for k, v in summary.items()})
    return DPOResult(r.out, stage_dir, out.train_metrics, out.eval_metrics, out.first_eval, summary)
