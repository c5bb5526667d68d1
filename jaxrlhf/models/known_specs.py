"""The public ``config.json`` of each seed model, by hub id, and its ModelSpec without a download.

``configs/<model>/*.yaml`` name these models by hub id (``model.path: meta-llama/Llama-2-7b-hf``); the loader
fetches the files only when a run starts. Tools that plan a run without the weights (``tests/test_recipes.py``
builds every recipe's parameters abstractly at full size, shards them and estimates memory) take the
architecture from here instead. The values are copied from each repository's ``config.json`` (only the keys
that :meth:`ModelSpec.from_hf_config` reads; defaults it applies are those of ``transformers``) and go through
the same mapping as a downloaded file, so a spec from this table equals the spec of the loaded model.

Parameter counts (``models.count_params``, tied embeddings once): Llama-2-7B 6.74B, Llama-3-8B 8.03B,
Mistral-7B 7.24B, BLOOMZ-7b1 7.07B, OPT-IML-1.3B 1.32B, Flan-T5-base 0.25B, Flan-T5-XL 2.85B, Flan-UL2 19.5B.
"""

from __future__ import annotations

import copy
from typing import Any

from jaxrlhf.models.spec import ModelSpec

_LLAMA2_7B = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "vocab_size": 32000,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

_LLAMA3_8B = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "hidden_act": "silu",
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "rope_scaling": None,
    "attention_bias": False,
    "tie_word_embeddings": False,
    "vocab_size": 128256,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}

_FLAN_T5 = {  # keys shared by the Flan-T5 sizes
    "model_type": "t5",
    "architectures": ["T5ForConditionalGeneration"],
    "d_kv": 64,
    "feed_forward_proj": "gated-gelu",
    "layer_norm_epsilon": 1e-06,
    "n_positions": 512,
    "relative_attention_max_distance": 128,
    "relative_attention_num_buckets": 32,
    "tie_word_embeddings": False,
    "vocab_size": 32128,
    "decoder_start_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": 0,
}

HF_CONFIGS: dict[str, dict[str, Any]] = {
    "meta-llama/Llama-2-7b-hf": _LLAMA2_7B,
    "meta-llama/Llama-2-7b-chat-hf": _LLAMA2_7B,
    "meta-llama/Meta-Llama-3-8B": _LLAMA3_8B,
    # the Instruct model ends its turns with <|eot_id|>
    "meta-llama/Meta-Llama-3-8B-Instruct": {**_LLAMA3_8B, "eos_token_id": 128009},
    "mistralai/Mistral-7B-v0.1": {
        "model_type": "mistral",
        "architectures": ["MistralForCausalLM"],
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "sliding_window": 4096,
        "tie_word_embeddings": False,
        "vocab_size": 32000,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
    "bigscience/bloomz-7b1": {
        "model_type": "bloom",
        "architectures": ["BloomForCausalLM"],
        "n_embed": 4096,
        "n_layer": 30,
        "num_attention_heads": 32,
        "layer_norm_epsilon": 1e-05,
        "apply_residual_connection_post_layernorm": False,
        "seq_length": 2048,
        "vocab_size": 250880,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 3,
    },
    "facebook/opt-iml-1.3b": {
        "model_type": "opt",
        "architectures": ["OPTForCausalLM"],
        "_remove_final_layer_norm": False,
        "activation_function": "relu",
        "do_layer_norm_before": True,
        "ffn_dim": 8192,
        "hidden_size": 2048,
        "max_position_embeddings": 2048,
        "num_attention_heads": 32,
        "num_hidden_layers": 24,
        "vocab_size": 50272,
        "word_embed_proj_dim": 2048,
        "bos_token_id": 2,
        "eos_token_id": 2,
        "pad_token_id": 1,
    },
    "google/flan-t5-base": {
        **_FLAN_T5,
        "d_model": 768,
        "d_ff": 2048,
        "num_heads": 12,
        "num_layers": 12,
        "num_decoder_layers": 12,
    },
    "google/flan-t5-xl": {
        **_FLAN_T5,
        "d_model": 2048,
        "d_ff": 5120,
        "num_heads": 32,
        "num_layers": 24,
        "num_decoder_layers": 24,
    },
    # UL2's config.json has no tie_word_embeddings key: transformers' T5 default (tied, scaled head) applies
    "google/flan-ul2": {
        "model_type": "t5",
        "architectures": ["T5ForConditionalGeneration"],
        "d_model": 4096,
        "d_ff": 16384,
        "d_kv": 256,
        "num_heads": 16,
        "num_layers": 32,
        "num_decoder_layers": 32,
        "feed_forward_proj": "gated-silu",
        "layer_norm_epsilon": 1e-06,
        "n_positions": 512,
        "relative_attention_max_distance": 128,
        "relative_attention_num_buckets": 32,
        "vocab_size": 32128,
        "decoder_start_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 0,
    },
}


def known_hf_config(hub_id: str) -> dict[str, Any]:
    """A copy of the ``config.json`` mapping of ``hub_id`` (one of :data:`HF_CONFIGS`)."""
    if hub_id not in HF_CONFIGS:
        raise KeyError(f"no known config.json for {hub_id!r}; known hub ids: {', '.join(sorted(HF_CONFIGS))}")
    return copy.deepcopy(HF_CONFIGS[hub_id])


def known_spec(hub_id: str) -> ModelSpec:
    """The ModelSpec that loading ``hub_id`` would build, from :data:`HF_CONFIGS` (no network)."""
    return ModelSpec.from_hf_config(known_hf_config(hub_id), source=f"known_specs[{hub_id!r}]")
