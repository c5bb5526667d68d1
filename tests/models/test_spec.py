"""Full-size specs from published config.json values build abstractly with the published parameter counts."""

from __future__ import annotations

import pytest
from _hf_tiny import TINY_NAMES, tiny_hf_config

from jaxrlhf import models
from jaxrlhf.models.spec import ModelSpec

# (published config.json values, published parameter count)
FULL_SIZE = {
    "Llama-2-7b": (
        dict(
            model_type="llama",
            vocab_size=32000,
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
        ),
        6.74e9,
    ),
    "Meta-Llama-3-8B": (
        dict(
            model_type="llama",
            vocab_size=128256,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            max_position_embeddings=8192,
            rms_norm_eps=1e-5,
            rope_theta=500000.0,
            tie_word_embeddings=False,
        ),
        8.03e9,
    ),
    "Mistral-7B-v0.1": (
        dict(
            model_type="mistral",
            vocab_size=32000,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            max_position_embeddings=32768,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            sliding_window=4096,
            tie_word_embeddings=False,
        ),
        7.24e9,
    ),
    "bloomz-7b1": (
        dict(
            model_type="bloom",
            vocab_size=250880,
            hidden_size=4096,
            n_layer=30,
            n_head=32,
            layer_norm_epsilon=1e-5,
            apply_residual_connection_post_layernorm=False,
        ),
        7.07e9,
    ),
    "opt-iml-1.3b": (
        dict(
            model_type="opt",
            vocab_size=50272,
            hidden_size=2048,
            ffn_dim=8192,
            num_hidden_layers=24,
            num_attention_heads=32,
            max_position_embeddings=2048,
            word_embed_proj_dim=2048,
            do_layer_norm_before=True,
            activation_function="relu",
            enable_bias=True,
        ),
        1.32e9,
    ),
}


@pytest.mark.parametrize("name", sorted(FULL_SIZE))
def test_full_size_parameter_counts(name):
    config, published = FULL_SIZE[name]
    spec = ModelSpec.from_hf_config(config)
    n = models.count_params(spec)  # jax.eval_shape: no memory
    assert abs(n - published) / published < 0.01, (
        f"{name}: {n / 1e9:.3f}B vs published {published / 1e9:.2f}B"
    )


def test_llama3_scaled_rope_spec_from_both_config_forms():
    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    scaling["original_max_position_embeddings"] = 8192
    old = dict(FULL_SIZE["Meta-Llama-3-8B"][0], rope_scaling=scaling)
    new = dict(FULL_SIZE["Meta-Llama-3-8B"][0])
    new.pop("rope_theta")
    new["rope_parameters"] = {"rope_theta": 500000.0, **old["rope_scaling"]}
    a, b = ModelSpec.from_hf_config(old), ModelSpec.from_hf_config(new)
    assert a == b and a.rope_scaling_dict["factor"] == 32.0 and a.rope_theta == 500000.0


@pytest.mark.parametrize("name", TINY_NAMES)
def test_spec_roundtrips_through_hf_config_and_json(name):
    spec = ModelSpec.from_hf_config(tiny_hf_config(name).to_dict())
    assert ModelSpec.from_hf_config(spec.to_hf_config()) == spec
    assert ModelSpec.from_json(spec.to_json()) == spec
    assert hash(spec) == hash(ModelSpec.from_json(spec.to_json()))
