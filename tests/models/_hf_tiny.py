"""Tiny random-init Hugging Face causal LMs (torch CPU, f32, eager attention) for parity tests.

``tiny_hf_causal_lm(name, tmp_path)`` builds one, perturbs every parameter (so norm weights, biases and
mis-mapped tensors all show up in the logits), saves it with ``save_pretrained`` and returns
``(hf_model, path)``. Reusable by any test that needs a real HF checkpoint on disk.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import transformers

VOCAB = 128

# name -> (config class name, kwargs)
TINY_CONFIGS: dict[str, tuple[str, dict]] = {
    "llama2": (
        "LlamaConfig",
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=64,
            tie_word_embeddings=False,
            rms_norm_eps=1e-5,
        ),
    ),
    "llama3": (
        "LlamaConfig",
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=True,
            rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        ),
    ),
    "llama3_scaled": (
        "LlamaConfig",
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=False,
            rms_norm_eps=1e-5,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        ),
    ),
    "mistral": (
        "MistralConfig",
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            sliding_window=4,
            tie_word_embeddings=False,
        ),
    ),
    "opt": (
        "OPTConfig",
        dict(
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            word_embed_proj_dim=32,
            do_layer_norm_before=True,
        ),
    ),
    "opt_post": (
        "OPTConfig",
        dict(
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            word_embed_proj_dim=16,
            do_layer_norm_before=False,
        ),
    ),
    "bloom": ("BloomConfig", dict(hidden_size=48, n_layer=2, n_head=6)),
    "gpt2": ("GPT2Config", dict(n_embd=32, n_layer=2, n_head=4, n_positions=64)),
}
TINY_NAMES = tuple(TINY_CONFIGS)


def tiny_hf_config(name: str, **overrides):
    cls_name, kw = TINY_CONFIGS[name]
    kw = {**kw, "vocab_size": VOCAB, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, **overrides}
    return getattr(transformers, cls_name)(**kw)


def tiny_hf_causal_lm(
    name: str, tmp_path: str | os.PathLike, *, seed: int = 0, dtype=torch.float32, **overrides
):
    """Build, perturb, save (safetensors) and return ``(hf_model.eval(), path)`` for family ``name``."""
    torch.manual_seed(seed)
    config = tiny_hf_config(name, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.add_(0.05 * torch.randn_like(p))
    model = model.to(dtype).eval()
    path = os.path.join(os.fspath(tmp_path), f"hf_{name}")
    model.save_pretrained(path)
    return model, path


def hf_logits(model, input_ids: np.ndarray, attention_mask: np.ndarray, positions: np.ndarray | None = None):
    """Logits ``[B, T, V]`` (f32 numpy) of an HF model; ``positions`` go in as ``position_ids`` if given."""
    kw = {}
    if positions is not None:
        kw["position_ids"] = torch.as_tensor(np.asarray(positions), dtype=torch.long)
    with torch.no_grad():
        out = model(
            input_ids=torch.as_tensor(np.asarray(input_ids), dtype=torch.long),
            attention_mask=torch.as_tensor(np.asarray(attention_mask), dtype=torch.long),
            **kw,
        )
    return out.logits.float().numpy()


def padded_batch(rng: np.random.Generator, lengths: list[int], total: int, side: str = "left"):
    """Random ids ``[B, total]`` in [3, VOCAB) and mask; each row has ``lengths[b]`` real tokens."""
    ids = rng.integers(3, VOCAB, size=(len(lengths), total))
    mask = np.zeros((len(lengths), total), np.int32)
    for b, n in enumerate(lengths):
        if side == "left":
            mask[b, total - n :] = 1
        else:
            mask[b, :n] = 1
    ids = np.where(mask == 1, ids, 0)
    return ids.astype(np.int32), mask
