"""One frozen ModelSpec for every supported family, mapped to and from Hugging Face ``config.json``.

The spec is hashable (all fields are scalars or tuples) so it can be a static argument of ``jax.jit``.
Family differences are expressed as options of one decoder (norm type, activation, position scheme, ...)
plus the encoder-decoder T5 family; nothing downstream branches on ``model_type`` strings except here and
in the weight-name maps of ``hf_io``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "opt", "bloom", "gpt2", "t5")

_ACTIVATIONS = ("silu", "relu", "gelu", "gelu_new", "gelu_pytorch_tanh", "bloom_gelu")


class ConfigError(ValueError):
    """A config.json that jaxrlhf cannot map onto a ModelSpec (names the file and the key)."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Architecture of one model. Shapes below use E=hidden_size, H=num_heads, K=num_kv_heads, D=head_dim.

    Decoder-only families are options of one decoder:
      llama/mistral: rmsnorm, gated silu MLP, RoPE (with optional llama3 scaling), GQA, optional window.
      opt:           layernorm (pre- or post-), relu MLP, learned positions with offset 2, optional
                     word_embed_proj_dim projection in/out of the stack.
      bloom:         layernorm, gelu (tanh), ALiBi, layernorm on the embeddings, fused QKV in HF files.
      gpt2:          layernorm, gelu_new, learned positions, HF Conv1D weights ([in, out]).
    Encoder-decoder:
      t5:            T5 layer norm (RMS without mean), relative position buckets, relu (v1.0) or gated-gelu
                     (v1.1 / Flan-T5 / UL2), tied head scaled by d_model**-0.5 or untied.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int = 2048
    norm_type: str = "rmsnorm"  # "rmsnorm" | "layernorm" | "t5"
    norm_eps: float = 1e-6
    activation: str = "silu"
    gated_mlp: bool = True
    position_type: str = "rope"  # "rope" | "learned" | "alibi" | "relative"
    rope_theta: float = 10000.0
    # rope scaling as sorted (key, value) pairs, e.g. (("factor", 8.0), ("rope_type", "llama3"), ...)
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    # OPT / BLOOM / GPT-2 specifics
    pre_norm: bool = True  # False = OPT-350m style post-LayerNorm
    final_norm: bool = True
    embed_norm: bool = False  # BLOOM word_embeddings_layernorm
    learned_pos_offset: int = 0  # OPT stores positions + 2
    word_embed_proj_dim: int | None = None  # OPT-350m projects embeddings E' -> E and back
    residual_post_norm: bool = False  # BLOOM apply_residual_connection_post_layernorm
    # T5 specifics
    num_decoder_layers: int = 0
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    scale_decoder_outputs: bool = False  # tied T5 head: multiply hidden by d_model**-0.5
    # special token ids (tuples where HF allows several)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    decoder_start_token_id: int | None = None

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"unsupported model_type {self.model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if self.activation not in _ACTIVATIONS:
            raise ConfigError(f"unsupported activation {self.activation!r}; supported: {_ACTIVATIONS}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )

    @property
    def is_encoder_decoder(self) -> bool:
        return self.model_type == "t5"

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return dict(self.rope_scaling) if self.rope_scaling else None

    def replace(self, **kw) -> ModelSpec:
        return dataclasses.replace(self, **kw)

    # ------------------------------------------------------------------ JSON
    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        d = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown ModelSpec keys {unknown}")
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = tuple(tuple(kv) for kv in d["rope_scaling"])
        d["eos_token_ids"] = tuple(d.get("eos_token_ids") or ())
        return cls(**d)

    # ------------------------------------------------------------------ Hugging Face
    @classmethod
    def from_hf_config(cls, config: dict[str, Any], source: str = "config.json") -> ModelSpec:
        """Map a Hugging Face config dict onto a ModelSpec. ``source`` names the file in errors."""
        mt = config.get("model_type")
        if mt not in _FROM_HF:
            supported = ", ".join(SUPPORTED_MODEL_TYPES)
            raise ConfigError(f"{source}: unsupported model_type {mt!r}; supported families: {supported}")
        try:
            return _FROM_HF[mt](config)
        except KeyError as e:
            raise ConfigError(f"{source}: missing key {e.args[0]!r} for model_type {mt!r}") from None

    def to_hf_config(self) -> dict[str, Any]:
        """A config dict that ``transformers.AutoConfig.for_model(**d)`` accepts for this family."""
        return _TO_HF[self.model_type](self)


def load_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read ``config.json`` from a model directory, with an error naming the directory when it is absent."""
    cfg_path = os.path.join(os.fspath(path), "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face model directory)")
    with open(cfg_path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{cfg_path}: invalid JSON ({e})") from None


# ---------------------------------------------------------------------------------------------- helpers


def _eos(config: dict) -> tuple[int, ...]:
    e = config.get("eos_token_id")
    if e is None:
        return ()
    return tuple(e) if isinstance(e, (list, tuple)) else (int(e),)


def _eos_out(spec: ModelSpec):
    if not spec.eos_token_ids:
        return None
    return spec.eos_token_ids[0] if len(spec.eos_token_ids) == 1 else list(spec.eos_token_ids)


def _rope(config: dict) -> tuple[float, tuple | None]:
    """Read rope theta/scaling from either transformers-5 ``rope_parameters`` or older ``rope_scaling``."""
    params = config.get("rope_parameters") or {}
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    scaling = config.get("rope_scaling") or {k: v for k, v in params.items() if k != "rope_theta"}
    if scaling:
        scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
        rtype = scaling.pop("rope_type", scaling.pop("type", "default"))
        if rtype in (None, "default"):
            return theta, None
        if rtype != "llama3":
            raise ConfigError(f"unsupported rope_scaling type {rtype!r}; supported: default, llama3")
        scaling["rope_type"] = rtype
        return theta, tuple(sorted((k, v) for k, v in scaling.items()))
    return theta, None


def _llama_like(c: dict) -> ModelSpec:
    theta, scaling = _rope(c)
    heads = c["num_attention_heads"]
    return ModelSpec(
        model_type=c["model_type"],
        vocab_size=c["vocab_size"],
        hidden_size=c["hidden_size"],
        num_layers=c["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=c.get("num_key_value_heads") or heads,
        head_dim=c.get("head_dim") or c["hidden_size"] // heads,
        intermediate_size=c["intermediate_size"],
        max_position_embeddings=c.get("max_position_embeddings", 2048),
        norm_type="rmsnorm",
        norm_eps=c.get("rms_norm_eps", 1e-6),
        activation=c.get("hidden_act", "silu"),
        gated_mlp=True,
        position_type="rope",
        rope_theta=theta,
        rope_scaling=scaling,
        sliding_window=c.get("sliding_window") if c["model_type"] == "mistral" else None,
        tie_word_embeddings=c.get("tie_word_embeddings", False),
        attention_bias=c.get("attention_bias", False),
        mlp_bias=c.get("mlp_bias", False),
        bos_token_id=c.get("bos_token_id"),
        eos_token_ids=_eos(c),
        pad_token_id=c.get("pad_token_id"),
    )


def _llama_like_out(s: ModelSpec) -> dict:
    rope = {"rope_theta": s.rope_theta, "rope_type": "default"}
    if s.rope_scaling:
        rope.update(dict(s.rope_scaling))
    d = dict(
        model_type=s.model_type,
        architectures=["LlamaForCausalLM" if s.model_type == "llama" else "MistralForCausalLM"],
        vocab_size=s.vocab_size,
        hidden_size=s.hidden_size,
        intermediate_size=s.intermediate_size,
        num_hidden_layers=s.num_layers,
        num_attention_heads=s.num_heads,
        num_key_value_heads=s.num_kv_heads,
        head_dim=s.head_dim,
        hidden_act=s.activation,
        max_position_embeddings=s.max_position_embeddings,
        rms_norm_eps=s.norm_eps,
        rope_theta=s.rope_theta,
        rope_parameters=rope,
        rope_scaling=dict(rope) if s.rope_scaling else None,
        tie_word_embeddings=s.tie_word_embeddings,
        bos_token_id=s.bos_token_id,
        eos_token_id=_eos_out(s),
        pad_token_id=s.pad_token_id,
    )
    if s.model_type == "llama":
        d.update(attention_bias=s.attention_bias, mlp_bias=s.mlp_bias)
    else:
        d.update(sliding_window=s.sliding_window)
    return d


def _opt(c: dict) -> ModelSpec:
    hidden = c["hidden_size"]
    proj = c.get("word_embed_proj_dim", hidden)
    return ModelSpec(
        model_type="opt",
        vocab_size=c["vocab_size"],
        hidden_size=hidden,
        num_layers=c["num_hidden_layers"],
        num_heads=c["num_attention_heads"],
        num_kv_heads=c["num_attention_heads"],
        head_dim=hidden // c["num_attention_heads"],
        intermediate_size=c["ffn_dim"],
        max_position_embeddings=c.get("max_position_embeddings", 2048),
        norm_type="layernorm",
        norm_eps=1e-5,
        activation=c.get("activation_function", "relu"),
        gated_mlp=False,
        position_type="learned",
        tie_word_embeddings=c.get("tie_word_embeddings", True),
        attention_bias=c.get("enable_bias", True),
        mlp_bias=c.get("enable_bias", True),
        pre_norm=c.get("do_layer_norm_before", True),
        final_norm=c.get("do_layer_norm_before", True) and not c.get("_remove_final_layer_norm", False),
        learned_pos_offset=2,
        word_embed_proj_dim=proj if proj != hidden else None,
        bos_token_id=c.get("bos_token_id"),
        eos_token_ids=_eos(c),
        pad_token_id=c.get("pad_token_id"),
    )


def _opt_out(s: ModelSpec) -> dict:
    return dict(
        model_type="opt",
        architectures=["OPTForCausalLM"],
        vocab_size=s.vocab_size,
        hidden_size=s.hidden_size,
        num_hidden_layers=s.num_layers,
        ffn_dim=s.intermediate_size,
        num_attention_heads=s.num_heads,
        max_position_embeddings=s.max_position_embeddings,
        activation_function=s.activation,
        do_layer_norm_before=s.pre_norm,
        _remove_final_layer_norm=s.pre_norm and not s.final_norm,
        word_embed_proj_dim=s.word_embed_proj_dim or s.hidden_size,
        enable_bias=s.attention_bias,
        tie_word_embeddings=s.tie_word_embeddings,
        bos_token_id=s.bos_token_id,
        eos_token_id=_eos_out(s),
        pad_token_id=s.pad_token_id,
    )


def _bloom(c: dict) -> ModelSpec:
    hidden = c.get("hidden_size", c.get("n_embed"))
    if hidden is None:
        raise KeyError("hidden_size")
    heads = c.get("n_head", c.get("num_attention_heads"))
    if heads is None:
        raise KeyError("n_head")
    return ModelSpec(
        model_type="bloom",
        vocab_size=c["vocab_size"],
        hidden_size=hidden,
        num_layers=c.get("n_layer", c.get("num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=4 * hidden,
        max_position_embeddings=c.get("seq_length", 2048) or 2048,
        norm_type="layernorm",
        norm_eps=c.get("layer_norm_epsilon", 1e-5),
        activation="bloom_gelu",
        gated_mlp=False,
        position_type="alibi",
        tie_word_embeddings=c.get("tie_word_embeddings", True),
        attention_bias=True,
        mlp_bias=True,
        embed_norm=True,
        residual_post_norm=c.get("apply_residual_connection_post_layernorm", False),
        bos_token_id=c.get("bos_token_id"),
        eos_token_ids=_eos(c),
        pad_token_id=c.get("pad_token_id"),
    )


def _bloom_out(s: ModelSpec) -> dict:
    return dict(
        model_type="bloom",
        architectures=["BloomForCausalLM"],
        vocab_size=s.vocab_size,
        hidden_size=s.hidden_size,
        n_layer=s.num_layers,
        n_head=s.num_heads,
        layer_norm_epsilon=s.norm_eps,
        apply_residual_connection_post_layernorm=s.residual_post_norm,
        tie_word_embeddings=s.tie_word_embeddings,
        bos_token_id=s.bos_token_id,
        eos_token_id=_eos_out(s),
        pad_token_id=s.pad_token_id,
    )


def _gpt2(c: dict) -> ModelSpec:
    hidden = c["n_embd"]
    return ModelSpec(
        model_type="gpt2",
        vocab_size=c["vocab_size"],
        hidden_size=hidden,
        num_layers=c["n_layer"],
        num_heads=c["n_head"],
        num_kv_heads=c["n_head"],
        head_dim=hidden // c["n_head"],
        intermediate_size=c.get("n_inner") or 4 * hidden,
        max_position_embeddings=c.get("n_positions", 1024),
        norm_type="layernorm",
        norm_eps=c.get("layer_norm_epsilon", 1e-5),
        activation=c.get("activation_function", "gelu_new"),
        gated_mlp=False,
        position_type="learned",
        tie_word_embeddings=c.get("tie_word_embeddings", True),
        attention_bias=True,
        mlp_bias=True,
        bos_token_id=c.get("bos_token_id"),
        eos_token_ids=_eos(c),
        pad_token_id=c.get("pad_token_id"),
    )


def _gpt2_out(s: ModelSpec) -> dict:
    return dict(
        model_type="gpt2",
        architectures=["GPT2LMHeadModel"],
        vocab_size=s.vocab_size,
        n_embd=s.hidden_size,
        n_layer=s.num_layers,
        n_head=s.num_heads,
        n_inner=s.intermediate_size,
        n_positions=s.max_position_embeddings,
        activation_function=s.activation,
        layer_norm_epsilon=s.norm_eps,
        tie_word_embeddings=s.tie_word_embeddings,
        bos_token_id=s.bos_token_id,
        eos_token_id=_eos_out(s),
        pad_token_id=s.pad_token_id,
    )


def _t5(c: dict) -> ModelSpec:
    ff = c.get("feed_forward_proj", "relu")
    gated = ff.startswith("gated-")
    act = ff.split("-", 1)[1] if gated else ff
    if act == "gelu":
        act = "gelu_new"  # HF maps "gated-gelu" to gelu_new
    tied = c.get("tie_word_embeddings", True)
    return ModelSpec(
        model_type="t5",
        vocab_size=c["vocab_size"],
        hidden_size=c["d_model"],
        num_layers=c["num_layers"],
        num_decoder_layers=c.get("num_decoder_layers") or c["num_layers"],
        num_heads=c["num_heads"],
        num_kv_heads=c["num_heads"],
        head_dim=c["d_kv"],
        intermediate_size=c["d_ff"],
        max_position_embeddings=c.get("n_positions", 512),
        norm_type="t5",
        norm_eps=c.get("layer_norm_epsilon", 1e-6),
        activation=act,
        gated_mlp=gated,
        position_type="relative",
        relative_attention_num_buckets=c.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=c.get("relative_attention_max_distance", 128),
        tie_word_embeddings=tied,
        scale_decoder_outputs=c.get("scale_decoder_outputs", tied),
        bos_token_id=c.get("bos_token_id"),
        eos_token_ids=_eos(c),
        pad_token_id=c.get("pad_token_id", 0),
        decoder_start_token_id=c.get("decoder_start_token_id", c.get("pad_token_id", 0)),
    )


def _t5_out(s: ModelSpec) -> dict:
    act = "gelu" if s.activation == "gelu_new" else s.activation
    return dict(
        model_type="t5",
        architectures=["T5ForConditionalGeneration"],
        vocab_size=s.vocab_size,
        d_model=s.hidden_size,
        d_kv=s.head_dim,
        d_ff=s.intermediate_size,
        num_layers=s.num_layers,
        num_decoder_layers=s.num_decoder_layers,
        num_heads=s.num_heads,
        relative_attention_num_buckets=s.relative_attention_num_buckets,
        relative_attention_max_distance=s.relative_attention_max_distance,
        layer_norm_epsilon=s.norm_eps,
        feed_forward_proj=("gated-" + act) if s.gated_mlp else act,
        tie_word_embeddings=s.tie_word_embeddings,
        scale_decoder_outputs=s.scale_decoder_outputs,
        is_encoder_decoder=True,
        eos_token_id=_eos_out(s),
        pad_token_id=s.pad_token_id,
        decoder_start_token_id=s.decoder_start_token_id,
    )


_FROM_HF = {
    "llama": _llama_like,
    "mistral": _llama_like,
    "opt": _opt,
    "bloom": _bloom,
    "gpt2": _gpt2,
    "t5": _t5,
}
_TO_HF = {
    "llama": _llama_like_out,
    "mistral": _llama_like_out,
    "opt": _opt_out,
    "bloom": _bloom_out,
    "gpt2": _gpt2_out,
    "t5": _t5_out,
}
