"""Tiny models and a tokenizer for the RL tests (shared by test_rollout, test_rewards, test_ppo*).

Specs of three families (Llama, GPT-2, T5) with the bundled tiny task's vocabulary (320 ids, ``<s>`` = 1,
``</s>`` = 2), random params perturbed so that the next-token distributions are far from uniform, LoRA
adapters with non-zero ``B`` (a fresh adapter would be the base model), and prompts of unequal lengths.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf import lora, models
from jaxrlhf.models import heads

VOCAB = 320  # jaxrlhf.assets.tiny.tokenizer_dir's vocabulary
LORA = lora.LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj"))

SPECS = {
    "llama": models.ModelSpec(
        model_type="llama", vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
        head_dim=8, intermediate_size=64, max_position_embeddings=128, norm_eps=1e-5, bos_token_id=1,
        eos_token_ids=(2,), pad_token_id=0,
    ),
    "gpt2": models.ModelSpec(
        model_type="gpt2", vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=4,
        head_dim=8, intermediate_size=128, max_position_embeddings=128, norm_type="layernorm", norm_eps=1e-5,
        activation="gelu_new", gated_mlp=False, position_type="learned", tie_word_embeddings=True,
        attention_bias=True, mlp_bias=True, eos_token_ids=(2,), pad_token_id=0,
    ),
    "t5": models.ModelSpec(
        model_type="t5", vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=4,
        head_dim=8, intermediate_size=64, norm_type="t5", activation="gelu_new", gated_mlp=True,
        position_type="relative", num_decoder_layers=2, relative_attention_num_buckets=8,
        relative_attention_max_distance=16, eos_token_ids=(2,), pad_token_id=0, decoder_start_token_id=0,
    ),
}  # fmt: skip


@functools.cache
def params(name: str, seed: int = 0) -> dict:
    """Params of ``SPECS[name]`` drawn in numpy (no compilation): norm scales 1, other leaves N(0, 0.02^2),
    plus N(0, s^2) noise on every leaf for peaked, varied distributions (s = 0.3; 0.15 for T5, whose
    unscaled attention makes logits grow faster)."""
    spec = SPECS[name]
    rng = np.random.default_rng(seed)
    s = 0.15 if spec.is_encoder_decoder else 0.3

    def draw(path, x):
        init = (
            np.ones(x.shape) if "scale" in jax.tree_util.keystr(path) else 0.02 * rng.standard_normal(x.shape)
        )
        return jnp.asarray(init + s * rng.standard_normal(x.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, models.abstract_params(spec))


def adapters(name: str, seed: int, base: dict | None = None) -> dict:
    """LoRA adapters (``LORA``) over ``base``'s targets: ``lora_a`` as peft inits it, ``lora_b`` random (so
    they change the model; a fresh adapter would be the base model)."""
    rng = np.random.default_rng(seed + 1000)
    base = params(name) if base is None else base
    out: dict = {}
    for path in lora.target_modules(SPECS[name], base, LORA):
        d_in, d_out = lora._get(base, path)["kernel"].shape
        bound = 1.0 / np.sqrt(d_in)
        ad = {
            "lora_a": jnp.asarray(rng.uniform(-bound, bound, (d_in, LORA.rank)), jnp.float32),
            "lora_b": jnp.asarray(0.3 * rng.standard_normal((LORA.rank, d_out)), jnp.float32),
        }
        lora._set(out, path, ad)
    return out


def head(name: str, seed: int, bias: float = 0.0) -> dict:
    """A value / reward head ``{"kernel" [E, 1], "bias" [1]}`` (kernel ~ N(0, 1/E), as heads.init_head)."""
    e = heads.head_input_dim(SPECS[name])
    kernel = np.random.default_rng(seed + 2000).standard_normal((e, 1)) / np.sqrt(e + 1.0)
    return {"kernel": jnp.asarray(kernel, jnp.float32), "bias": jnp.full((1,), bias, jnp.float32)}


def prompts(lengths=(3, 7, 5, 1), width: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded random prompts ``[B, width]`` with ``lengths[b]`` tokens in [3, VOCAB); mask int32."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(lengths), width), np.int32)
    mask = np.zeros((len(lengths), width), np.int32)
    for b, n in enumerate(lengths):
        ids[b, width - n :] = rng.integers(3, VOCAB, size=n)
        mask[b, width - n :] = 1
    return ids, mask
