"""T5 parameter layout: one table gives shapes, logical axes, init scales and Hugging Face names.

Param tree (2-D kernels are [in, out]; HD = num_heads * d_kv; HF names after the arrow, with
"{enc}" = "encoder.block.{i}.layer"):

    shared/embedding [V, E]                           -> shared.weight
    encoder/relative_attention_bias/embedding [32, H] -> {enc 0}.0.SelfAttention.relative_attention_bias.*
    encoder/layers_{i}/input_norm/scale [E]           -> {enc}.0.layer_norm.weight
    encoder/layers_{i}/attn/{q,k,v}_proj/kernel [E,HD] -> {enc}.0.SelfAttention.{q,k,v}.weight
    encoder/layers_{i}/attn/o_proj/kernel [HD, E]     -> {enc}.0.SelfAttention.o.weight
    encoder/layers_{i}/post_attn_norm/scale [E]       -> {enc}.1.layer_norm.weight
    encoder/layers_{i}/mlp/gate_proj/kernel [E, F]    -> {enc}.1.DenseReluDense.wi_0.weight (gated only)
    encoder/layers_{i}/mlp/up_proj/kernel [E, F]      -> {enc}.1.DenseReluDense.wi_1.weight (gated) / wi
    encoder/layers_{i}/mlp/down_proj/kernel [F, E]    -> {enc}.1.DenseReluDense.wo.weight
    encoder/final_norm/scale [E]                      -> encoder.final_layer_norm.weight
    decoder/...  as the encoder, plus cross_attn_norm (layer.1.layer_norm) and cross_attn/{q,k,v,o}_proj
                 (layer.1.EncDecAttention); the MLP is layer.2 and its norm layer.2.layer_norm.
    lm_head/kernel [E, V]                             -> lm_head.weight (untied heads only)

MLP names follow the decoder-only families (gate_proj/up_proj/down_proj) so one LoRA target regex works for
every family.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf.models import weights
from jaxrlhf.models.spec import ModelSpec

# HF checkpoints written by older transformers may carry this unused tensor; transformers ignores it too.
HF_IGNORED_KEYS = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)


@dataclasses.dataclass(frozen=True)
class Leaf:
    shape: tuple[int, ...]
    axes: tuple[str, ...]
    std: float | None  # None: ones (norm scales)
    hf_name: str
    linear: bool  # torch nn.Linear [out, in] <-> kernel [in, out]


def check_spec(spec: ModelSpec) -> None:
    if spec.model_type != "t5":
        raise ValueError(f"jaxrlhf.models.t5 handles model_type 't5', got {spec.model_type!r}")


def _attn(spec: ModelSpec, hf: str) -> dict:
    e, hd = spec.hidden_size, spec.num_heads * spec.head_dim
    return {
        "q_proj": {
            "kernel": Leaf((e, hd), ("embed", "heads"), (e * spec.head_dim) ** -0.5, f"{hf}.q.weight", True)
        },
        "k_proj": {"kernel": Leaf((e, hd), ("embed", "heads"), e**-0.5, f"{hf}.k.weight", True)},
        "v_proj": {"kernel": Leaf((e, hd), ("embed", "heads"), e**-0.5, f"{hf}.v.weight", True)},
        "o_proj": {"kernel": Leaf((hd, e), ("heads", "embed"), hd**-0.5, f"{hf}.o.weight", True)},
    }


def _mlp(spec: ModelSpec, hf: str) -> dict:
    e, f = spec.hidden_size, spec.intermediate_size
    out = {
        "up_proj": {
            "kernel": Leaf(
                (e, f), ("embed", "mlp"), e**-0.5, f"{hf}.wi{'_1' if spec.gated_mlp else ''}.weight", True
            )
        },
        "down_proj": {"kernel": Leaf((f, e), ("mlp", "embed"), f**-0.5, f"{hf}.wo.weight", True)},
    }
    if spec.gated_mlp:
        out["gate_proj"] = {"kernel": Leaf((e, f), ("embed", "mlp"), e**-0.5, f"{hf}.wi_0.weight", True)}
    return out


def _norm(spec: ModelSpec, hf: str) -> dict:
    return {"scale": Leaf((spec.hidden_size,), ("norm",), None, hf, False)}


def layout(spec: ModelSpec) -> dict:
    """Nested dict of :class:`Leaf` records; params, axes and HF names all derive from it."""
    check_spec(spec)
    e, v = spec.hidden_size, spec.vocab_size
    rel = (spec.relative_attention_num_buckets, spec.num_heads)
    tree: dict = {"shared": {"embedding": Leaf((v, e), ("vocab", "embed"), 1.0, "shared.weight", False)}}
    for stack, n_layers in (
        ("encoder", spec.num_layers),
        ("decoder", spec.num_decoder_layers or spec.num_layers),
    ):
        rel_name = f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        s: dict = {
            "relative_attention_bias": {
                "embedding": Leaf(rel, ("rel_buckets", "heads"), e**-0.5, rel_name, False)
            }
        }
        for i in range(n_layers):
            b = f"{stack}.block.{i}.layer"
            layer = {
                "input_norm": _norm(spec, f"{b}.0.layer_norm.weight"),
                "attn": _attn(spec, f"{b}.0.SelfAttention"),
            }
            ff = 1
            if stack == "decoder":
                layer["cross_attn_norm"] = _norm(spec, f"{b}.1.layer_norm.weight")
                layer["cross_attn"] = _attn(spec, f"{b}.1.EncDecAttention")
                ff = 2
            layer["post_attn_norm"] = _norm(spec, f"{b}.{ff}.layer_norm.weight")
            layer["mlp"] = _mlp(spec, f"{b}.{ff}.DenseReluDense")
            s[f"layers_{i}"] = layer
        s["final_norm"] = _norm(spec, f"{stack}.final_layer_norm.weight")
        tree[stack] = s
    if not spec.tie_word_embeddings:
        tree["lm_head"] = {"kernel": Leaf((e, v), ("embed", "vocab"), 1.0, "lm_head.weight", True)}
    return tree


def leaves(tree: dict, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Leaf]]:
    for k, val in tree.items():
        if isinstance(val, Leaf):
            yield prefix + (k,), val
        else:
            yield from leaves(val, prefix + (k,))


def _map(tree: dict, fn: Callable, prefix: tuple[str, ...] = ()) -> dict:
    return {
        k: fn(prefix + (k,), v) if isinstance(v, Leaf) else _map(v, fn, prefix + (k,))
        for k, v in tree.items()
    }


def init_params(spec: ModelSpec, rng: jax.Array, dtype=jnp.float32) -> dict:
    """Random params with Hugging Face's T5 init scales (normal(0, std); norm scales = 1).

    Each leaf draws from ``fold_in(rng, crc32(path))``, so adding a layer does not reshuffle the others.
    """

    def init(path, leaf: Leaf):
        if leaf.std is None:
            return jnp.ones(leaf.shape, dtype)
        key = jax.random.fold_in(rng, zlib.crc32("/".join(path).encode()) & 0x7FFFFFFF)
        return (leaf.std * jax.random.normal(key, leaf.shape, jnp.float32)).astype(dtype)

    return _map(layout(spec), init)


def param_axes(spec: ModelSpec) -> dict:
    """Same tree as :func:`init_params`, leaves are logical-axis tuples from ``sharding.LOGICAL_RULES``."""
    return _map(layout(spec), lambda _, leaf: leaf.axes)


def hf_weight_specs(spec: ModelSpec) -> list[weights.WeightSpec]:
    """One WeightSpec per tensor, HF names with the ``T5ForConditionalGeneration`` prefixes.

    Only the canonical tensors are listed: ``shared.weight`` (plus ``lm_head.weight`` when untied). The tied
    copies that some checkpoints also carry are named by :func:`hf_tied_copies`.
    """
    out = []
    for path, leaf in leaves(layout(spec)):
        out.append(weights.linear(leaf.hf_name, path) if leaf.linear else weights.copy(leaf.hf_name, path))
    return out


def hf_tied_copies(spec: ModelSpec) -> dict[str, str]:
    """HF names that hold copies of another tensor -> the name they copy.

    On load such a copy may be absent or equal to its source (then ignore it); on save, safetensors files need
    only the source (transformers re-ties on load), while a strict ``load_state_dict`` needs them all.
    """
    check_spec(spec)
    out = {"encoder.embed_tokens.weight": "shared.weight", "decoder.embed_tokens.weight": "shared.weight"}
    if spec.tie_word_embeddings:
        out["lm_head.weight"] = "shared.weight"
    return out


def hf_architecture(spec: ModelSpec) -> str:
    check_spec(spec)
    return "T5ForConditionalGeneration"


def spec_for_checkpoint(spec: ModelSpec, hf_names, read: Callable[[str], np.ndarray]) -> ModelSpec:
    """Fix the head tying of a spec read from config.json by looking at the checkpoint's tensors.

    transformers >= 5 always writes ``"tie_word_embeddings": true`` for T5 (``scale_decoder_outputs`` carries
    the v1.0 / v1.1 difference), so an untied Flan-T5 saved by it looks tied in config.json. A checkpoint
    with an ``lm_head.weight`` that differs from ``shared.weight`` is untied whatever its config says.
    ``hf_names``: the tensor names in the checkpoint; ``read(name)`` returns one tensor.
    """
    check_spec(spec)
    names = set(hf_names)
    if spec.tie_word_embeddings and "lm_head.weight" in names:
        if not np.array_equal(np.asarray(read("lm_head.weight")), np.asarray(read("shared.weight"))):
            return spec.replace(tie_word_embeddings=False)
    if not spec.tie_word_embeddings and "lm_head.weight" not in names:
        return spec.replace(tie_word_embeddings=True)
    return spec
