"""Weight-name maps of the decoder-only families (HF CausalLM state-dict names <-> jaxrlhf param paths).

Fused HF tensors are split into q/k/v params at load and re-fused at save:
  GPT-2 ``c_attn``: Conv1D weight ``[E, 3E]`` = ``[q | k | v]`` along the output dim (already ``[in, out]``).
  BLOOM ``query_key_value``: Linear weight ``[3*H*D, E]`` whose output dim is laid out per head as
  ``[H, 3, D]`` (q, k, v interleaved head by head), bias ``[3*H*D]`` likewise.
"""

from __future__ import annotations

import re

import numpy as np

from jaxrlhf.models.spec import ModelSpec
from jaxrlhf.models.weights import WeightSpec, copy, linear

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "opt": "OPTForCausalLM",
    "bloom": "BloomForCausalLM",
    "gpt2": "GPT2LMHeadModel",
}
# prefixes that base-model checkpoints (LlamaModel, OPTModel, ...) lack
PREFIXES = {
    "llama": ("model.",),
    "mistral": ("model.",),
    "opt": ("model.",),
    "bloom": ("transformer.",),
    "gpt2": ("transformer.",),
}
# buffers some checkpoints carry that are not parameters
_IGNORABLE = (r".*rotary_emb\.inv_freq", r".*attn\.(masked_)?bias")


def is_ignorable(spec: ModelSpec, name: str) -> bool:
    if spec.tie_word_embeddings and name == "lm_head.weight":
        return True  # some exporters write the tied head anyway
    if spec.is_encoder_decoder:
        from jaxrlhf.models import t5

        return name in t5.hf_tied_copies(spec) or name in t5.HF_IGNORED_KEYS
    return any(re.fullmatch(p, name) for p in _IGNORABLE)


def _norm(hf: str, path: tuple[str, ...], bias: bool) -> list[WeightSpec]:
    out = [copy(f"{hf}.weight", (*path, "scale"))]
    if bias:
        out.append(copy(f"{hf}.bias", (*path, "bias")))
    return out


def _dense(hf: str, path: tuple[str, ...], bias: bool, conv1d: bool = False) -> list[WeightSpec]:
    out = [(copy if conv1d else linear)(f"{hf}.weight", (*path, "kernel"))]
    if bias:
        out.append(copy(f"{hf}.bias", (*path, "bias")))
    return out


def _split_last(n: int):
    def load(xs):
        return [np.ascontiguousarray(a) for a in np.split(xs[0], n, axis=-1)]

    def save(xs):
        return [np.concatenate(xs, axis=-1)]

    return load, save


def _bloom_qkv(heads: int, head_dim: int, is_bias: bool):
    """[3HD, E] (or [3HD]) fused per head as [H, 3, D] <-> three kernels [E, HD] (or biases [HD])."""

    def load(xs):
        w = xs[0]
        if is_bias:
            w = w.reshape(heads, 3, head_dim)
            return [np.ascontiguousarray(w[:, i].reshape(-1)) for i in range(3)]
        w = w.reshape(heads, 3, head_dim, w.shape[-1])
        return [np.ascontiguousarray(w[:, i].reshape(heads * head_dim, -1).T) for i in range(3)]

    def save(xs):
        if is_bias:
            return [np.stack([x.reshape(heads, head_dim) for x in xs], axis=1).reshape(-1)]
        e = xs[0].shape[0]
        parts = [x.T.reshape(heads, head_dim, e) for x in xs]
        return [np.ascontiguousarray(np.stack(parts, axis=1).reshape(3 * heads * head_dim, e))]

    return load, save


def decoder_weight_specs(spec: ModelSpec) -> list[WeightSpec]:
    """WeightSpecs for every param of a decoder-only ``spec``, in checkpoint order."""
    fn = {"llama": _llama, "mistral": _llama, "opt": _opt, "bloom": _bloom, "gpt2": _gpt2}[spec.model_type]
    out = fn(spec)
    if not spec.tie_word_embeddings:
        out.append(linear("lm_head.weight", ("lm_head", "kernel")))
    return out


def _llama(s: ModelSpec) -> list[WeightSpec]:
    out = [copy("model.embed_tokens.weight", ("embed_tokens", "embedding"))]
    for i in range(s.num_layers):
        hf, p = f"model.layers.{i}", f"layers_{i}"
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out += _dense(f"{hf}.self_attn.{n}", (p, "attn", n), s.attention_bias)
        for n in ("gate_proj", "up_proj", "down_proj"):
            out += _dense(f"{hf}.mlp.{n}", (p, "mlp", n), s.mlp_bias)
        out += _norm(f"{hf}.input_layernorm", (p, "input_norm"), False)
        out += _norm(f"{hf}.post_attention_layernorm", (p, "post_attn_norm"), False)
    out += _norm("model.norm", ("final_norm",), False)
    return out


def _opt(s: ModelSpec) -> list[WeightSpec]:
    d = "model.decoder"
    out = [
        copy(f"{d}.embed_tokens.weight", ("embed_tokens", "embedding")),
        copy(f"{d}.embed_positions.weight", ("embed_positions", "embedding")),
    ]
    if s.word_embed_proj_dim:
        out += _dense(f"{d}.project_in", ("project_in",), False)
        out += _dense(f"{d}.project_out", ("project_out",), False)
    for i in range(s.num_layers):
        hf, p = f"{d}.layers.{i}", f"layers_{i}"
        for n, ours in (
            ("q_proj", "q_proj"),
            ("k_proj", "k_proj"),
            ("v_proj", "v_proj"),
            ("out_proj", "o_proj"),
        ):
            out += _dense(f"{hf}.self_attn.{n}", (p, "attn", ours), s.attention_bias)
        out += _dense(f"{hf}.fc1", (p, "mlp", "up_proj"), s.mlp_bias)
        out += _dense(f"{hf}.fc2", (p, "mlp", "down_proj"), s.mlp_bias)
        out += _norm(f"{hf}.self_attn_layer_norm", (p, "input_norm"), True)
        out += _norm(f"{hf}.final_layer_norm", (p, "post_attn_norm"), True)
    if s.final_norm:
        out += _norm(f"{d}.final_layer_norm", ("final_norm",), True)
    return out


def _bloom(s: ModelSpec) -> list[WeightSpec]:
    t = "transformer"
    out = [copy(f"{t}.word_embeddings.weight", ("embed_tokens", "embedding"))]
    out += _norm(f"{t}.word_embeddings_layernorm", ("embed_norm",), True)
    for i in range(s.num_layers):
        hf, p = f"{t}.h.{i}", f"layers_{i}"
        qkv = [(p, "attn", n) for n in ("q_proj", "k_proj", "v_proj")]
        w_load, w_save = _bloom_qkv(s.num_heads, s.head_dim, False)
        b_load, b_save = _bloom_qkv(s.num_heads, s.head_dim, True)
        out.append(
            WeightSpec(
                (f"{hf}.self_attention.query_key_value.weight",),
                tuple((*q, "kernel") for q in qkv),
                w_load,
                w_save,
            )
        )
        out.append(
            WeightSpec(
                (f"{hf}.self_attention.query_key_value.bias",),
                tuple((*q, "bias") for q in qkv),
                b_load,
                b_save,
            )
        )
        out += _dense(f"{hf}.self_attention.dense", (p, "attn", "o_proj"), True)
        out += _dense(f"{hf}.mlp.dense_h_to_4h", (p, "mlp", "up_proj"), True)
        out += _dense(f"{hf}.mlp.dense_4h_to_h", (p, "mlp", "down_proj"), True)
        out += _norm(f"{hf}.input_layernorm", (p, "input_norm"), True)
        out += _norm(f"{hf}.post_attention_layernorm", (p, "post_attn_norm"), True)
    out += _norm(f"{t}.ln_f", ("final_norm",), True)
    return out


def _gpt2(s: ModelSpec) -> list[WeightSpec]:
    t = "transformer"
    out = [
        copy(f"{t}.wte.weight", ("embed_tokens", "embedding")),
        copy(f"{t}.wpe.weight", ("embed_positions", "embedding")),
    ]
    load, save = _split_last(3)
    for i in range(s.num_layers):
        hf, p = f"{t}.h.{i}", f"layers_{i}"
        qkv = [(p, "attn", n) for n in ("q_proj", "k_proj", "v_proj")]
        for kind in ("weight", "bias"):
            leaf = "kernel" if kind == "weight" else "bias"
            out.append(WeightSpec((f"{hf}.attn.c_attn.{kind}",), tuple((*q, leaf) for q in qkv), load, save))
        out += _dense(f"{hf}.attn.c_proj", (p, "attn", "o_proj"), True, conv1d=True)
        out += _dense(f"{hf}.mlp.c_fc", (p, "mlp", "up_proj"), True, conv1d=True)
        out += _dense(f"{hf}.mlp.c_proj", (p, "mlp", "down_proj"), True, conv1d=True)
        out += _norm(f"{hf}.ln_1", (p, "input_norm"), True)
        out += _norm(f"{hf}.ln_2", (p, "post_attn_norm"), True)
    out += _norm(f"{t}.ln_f", ("final_norm",), True)
    return out
