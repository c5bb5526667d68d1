"""Reward model = backbone (optionally with LoRA adapters) + scalar head; scoring and export to HF.

``score`` is the pure scoring function every stage uses (RM training and evaluation, PPO rewards);
``export_hf`` writes a ``*ForSequenceClassification`` directory (num_labels = 1) that transformers loads.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf import models
from jaxrlhf.models import heads
from jaxrlhf.models.spec import ModelSpec

# HF sequence-classification classes of the decoder-only families: all have ``score.weight [N, E]``, no bias
SEQ_CLS_ARCHITECTURES = {
    "llama": "LlamaForSequenceClassification",
    "mistral": "MistralForSequenceClassification",
    "opt": "OPTForSequenceClassification",
    "bloom": "BloomForSequenceClassification",
    "gpt2": "GPT2ForSequenceClassification",
}


def score(
    spec: ModelSpec,
    params: dict,
    head: dict,
    tokens: jax.Array,  # [B, T] int
    mask: jax.Array,  # [B, T] 1 = real token
    *,
    lora: dict | None = None,
    lora_config: Any = None,
    decoder_input_ids: jax.Array | None = None,
    **forward_kwargs: Any,
) -> jax.Array:
    """Scalar reward ``[B]`` (float32) of each sequence.

    Decoder-only: ``head(hidden at the last token with mask 1)``; works for left and right padding.
    T5: the encoder reads ``tokens``; the decoder runs on ``decoder_input_ids`` (default: one
    ``decoder_start_token_id`` per row) and the hidden state at its last position is scored, i.e. the
    decoder's first position after the full input. Extra keyword arguments (``compute_dtype``, ``remat``,
    ``attention_impl``, ``dropout_rng``, ...) go to :func:`jaxrlhf.models.forward`. Jit the caller: the
    unused LM-head logits are then removed by XLA.
    """
    if spec.is_encoder_decoder:
        if decoder_input_ids is None:
            start = spec.decoder_start_token_id if spec.decoder_start_token_id is not None else 0
            decoder_input_ids = jnp.full((tokens.shape[0], 1), start, jnp.int32)
        out = models.forward(
            spec,
            params,
            tokens,
            mask,
            decoder_input_ids=decoder_input_ids,
            lora=lora,
            lora_config=lora_config,
            **forward_kwargs,
        )
        pooled = out.hidden[:, -1]
    else:
        if decoder_input_ids is not None:
            raise ValueError(f"{spec.model_type} is decoder-only: decoder_input_ids does not apply")
        out = models.forward(spec, params, tokens, mask, lora=lora, lora_config=lora_config, **forward_kwargs)
        pooled = heads.pool_last(out.hidden, mask)
    return heads.apply_head(head, pooled)[:, 0]


def concat_pairs(batch: dict) -> tuple[jax.Array, jax.Array]:
    """Stack a preference batch's chosen and rejected rows into one ``[2B, T]`` batch (chosen first).

    The two halves are padded to the same length with zeros (mask 0) on the right when they differ.
    """
    c_ids, r_ids = batch["chosen_input_ids"], batch["rejected_input_ids"]
    c_mask, r_mask = batch["chosen_attention_mask"], batch["rejected_attention_mask"]
    t = max(c_ids.shape[1], r_ids.shape[1])

    def pad(x):
        return jnp.pad(x, ((0, 0), (0, t - x.shape[1])))

    ids = jnp.concatenate([pad(c_ids), pad(r_ids)], axis=0)
    mask = jnp.concatenate([pad(c_mask), pad(r_mask)], axis=0)
    return ids, mask


def score_pairs(
    spec: ModelSpec, params: dict, head: dict, batch: dict, *, shape: Any = None, **kwargs: Any
) -> tuple[jax.Array, jax.Array]:
    """``(r_chosen [B], r_rejected [B])`` from one forward pass over the pair batch.

    Decoder-only with ``shape`` (:func:`jaxrlhf.pairs.pair_shape`; the batch needs its loss masks): each pair
    is one shared-prompt row (:func:`jaxrlhf.pairs.pack_pairs`), the prompt computed once, and each side is
    scored at its last token; without: chosen and rejected rows concatenated along the batch. Same scores.
    """
    if shape is not None and not spec.is_encoder_decoder:
        return _score_packed(spec, params, head, batch, shape, **kwargs)
    ids, mask = concat_pairs(batch)
    rewards = score(spec, params, head, ids, mask, **kwargs)
    b = batch["chosen_input_ids"].shape[0]
    return rewards[:b], rewards[b:]


def _score_packed(spec, params, head, batch, shape, **forward_kwargs):
    from jaxrlhf.pairs import forward_pairs

    _, _, layout, out = forward_pairs(spec, params, batch, shape, **forward_kwargs)
    s, a, e = layout.shared, layout.split, layout.end
    # chosen ends at a - 1; rejected at e - 1, or inside the shared prompt when it has no tokens of its own
    last = jnp.stack([a - 1, jnp.where(e > a, e - 1, s - 1)], axis=1)
    pooled = jnp.take_along_axis(out.hidden, jnp.maximum(last, 0)[:, :, None], axis=1)  # [B, 2, E]
    r = heads.apply_head(head, pooled.reshape(-1, pooled.shape[-1]))[:, 0].reshape(-1, 2)
    return r[:, 0], r[:, 1]


class RewardModel(NamedTuple):
    """A trained reward model as the RM stage leaves it (``jaxrlhf rm``): score with
    ``score(spec, params, head, ids, mask, lora=lora, lora_config=lora_config)``; ``stats`` holds the reward
    ``mean`` / ``std`` over the RM's eval split (``(r - mean) / std`` normalises rewards for PPO)."""

    spec: ModelSpec
    params: dict
    head: dict
    lora: dict | None
    lora_config: Any
    stats: dict
    tokenizer_dir: str | None


def load(stage_dir: str | os.PathLike, *, mesh: Any = None, dtype: Any = None) -> RewardModel:
    """Read an RM stage checkpoint (``params/``, optional ``lora/``, ``reward_head/``, ``reward_stats.json``).

    With ``mesh`` the backbone is sharded by its logical axes and the head replicated on the mesh.
    """
    from jaxrlhf import train

    ckpt = train.load_stage(stage_dir, mesh=mesh, dtype=dtype, extras=("reward_head",))
    if ckpt.stage_info.get("stage") != "rm" or "reward_stats" not in ckpt.extras:
        raise ValueError(
            f"{ckpt.path}: not a reward-model stage checkpoint (stage {ckpt.stage_info.get('stage')!r})"
        )
    head = ckpt.extras["reward_head"]
    if dtype is not None:
        head = jax.tree.map(lambda x: x.astype(dtype), head)
    if mesh is not None:
        from jaxrlhf import sharding

        head = jax.device_put(head, sharding.replicated(mesh))
    return RewardModel(
        ckpt.spec,
        ckpt.params,
        head,
        ckpt.lora,
        ckpt.lora_config,
        ckpt.extras["reward_stats"],
        ckpt.tokenizer_dir,
    )


# ---------------------------------------------------------------------------------------------- HF export

_TORCH_DTYPE = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def _get_path(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _final_norm_fold(spec: ModelSpec, params: dict, head: dict) -> dict | None:
    """Params whose final LayerNorm bias absorbs the head bias, or None when the family cannot.

    HF's score layer has no bias. With a LayerNorm as the last op before the head (GPT-2, BLOOM, pre-norm
    OPT without project_out), adding ``u = b k / |k|^2`` to the norm's bias gives ``(h + u) k = h k + b``.
    The LM head of the exported model is unused by the classifier, so changing that bias is harmless.
    """
    if spec.norm_type != "layernorm" or not spec.final_norm or spec.word_embed_proj_dim:
        return None
    norm = params.get("final_norm", {})
    if "bias" not in norm:
        return None
    k = np.asarray(head["kernel"], np.float64)[:, 0]
    b = float(np.asarray(head["bias"], np.float64)[0])
    u = b * k / float(k @ k)
    new_norm = dict(norm, bias=jnp.asarray(np.asarray(norm["bias"], np.float64) + u, norm["bias"].dtype))
    return dict(params, final_norm=new_norm)


def export_hf(
    spec: ModelSpec,
    params: dict,
    head: dict,
    out_dir: str | os.PathLike,
    *,
    pad_token_id: int | None = None,
) -> str:
    """Write ``out_dir`` as a HF ``*ForSequenceClassification`` model (num_labels = 1); returns the path.

    The backbone uses the same tensor names as ``models.save_pretrained`` (the CausalLM names; the
    sequence-classification classes share them) minus ``lm_head``; the head becomes ``score.weight [1, E]``.
    HF pools at the last token that is not ``pad_token_id``, so ``pad_token_id`` (argument or spec) is
    required, and real tokens must never equal it. The head bias (HF has none) is folded into the final
    LayerNorm bias where the family has one; otherwise (RMSNorm families) it is dropped, written to
    ``config.json`` as ``jaxrlhf_reward_bias``, and HF scores differ from ``score`` by that constant (which
    changes no preference comparison). LoRA adapters must be merged into ``params`` first (``lora.merge``).
    """
    from jaxrlhf.models import hf_io

    if spec.model_type not in SEQ_CLS_ARCHITECTURES:
        raise ValueError(
            f"export_hf: no Hugging Face sequence-classification export for {spec.model_type!r} "
            "(T5ForSequenceClassification pools at the decoder's EOS through a tanh dense layer, "
            "which the jaxrlhf T5 reward head does not have)"
        )
    if head["kernel"].shape[-1] != 1:
        raise ValueError(f"export_hf: only one-output heads export (kernel {head['kernel'].shape})")
    pad = spec.pad_token_id if pad_token_id is None else pad_token_id
    if pad is None:
        raise ValueError("export_hf: pad_token_id is needed (HF pools at the last non-pad token); pass it")
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    bias = float(np.asarray(head["bias"])[0])
    folded = _final_norm_fold(spec, params, head) if bias != 0.0 else params
    dropped_bias = bias if folded is None else 0.0
    if folded is None:
        folded = params
        warnings.warn(
            f"export_hf: {spec.model_type} has no final LayerNorm bias to absorb the reward-head bias "
            f"{bias:.6g}; HF scores will be lower by that constant (recorded as jaxrlhf_reward_bias)",
            stacklevel=2,
        )
    dtype = np.dtype(jax.tree.leaves(params)[0].dtype)
    tensors = {}
    for ws in hf_io.hf_weight_specs(spec):
        if any(name.startswith("lm_head.") for name in ws.hf_names):
            continue
        arrays = [np.asarray(jax.device_get(_get_path(folded, p))) for p in ws.paths]
        tensors.update(zip(ws.hf_names, ws.save(arrays), strict=True))
    tensors["score.weight"] = np.ascontiguousarray(np.asarray(head["kernel"]).T).astype(dtype)
    hf_io.write_safetensors(os.path.join(out_dir, "model.safetensors"), tensors)
    config = spec.to_hf_config()
    config.update(
        architectures=[SEQ_CLS_ARCHITECTURES[spec.model_type]],
        num_labels=1,
        id2label={"0": "LABEL_0"},
        label2id={"LABEL_0": 0},
        pad_token_id=pad,
        jaxrlhf_reward_bias=dropped_bias,
    )
    config["torch_dtype"] = config["dtype"] = _TORCH_DTYPE.get(dtype.name, "float32")
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return out_dir
