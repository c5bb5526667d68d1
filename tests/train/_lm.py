"""A tiny Llama spec and a next-token cross-entropy loss over ``models.forward`` (full or LoRA)."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf import models

TINY_LLAMA = models.ModelSpec(
    model_type="llama",
    vocab_size=128,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    intermediate_size=64,
    max_position_embeddings=64,
    rope_theta=500000.0,
    norm_eps=1e-5,
)


def lm_loss(spec, *, lora_config=None, compute_dtype=None):
    """``loss_fn(params, frozen, batch, rng)``: token-mean NLL of ``input_ids[:, 1:]`` where ``mask`` is 1.

    Full fine-tuning: ``params`` is the model, ``frozen`` None; LoRA: ``params`` are adapters on ``frozen``.
    """

    def loss_fn(params, frozen, batch, rng):
        base, adapters = (params, None) if lora_config is None else (frozen, params)
        out = models.forward(
            spec,
            base,
            batch["input_ids"],
            batch["mask"],
            lora=adapters,
            lora_config=lora_config,
            compute_dtype=compute_dtype,
            dropout_rng=rng if lora_config is not None else None,
        )
        logp = jax.nn.log_softmax(out.logits[:, :-1].astype(jnp.float32))
        nll = -jnp.take_along_axis(logp, batch["input_ids"][:, 1:, None], -1)[..., 0]
        m = batch["mask"][:, 1:].astype(jnp.float32)
        n = m.sum()
        return (nll * m).sum() / n, {"weight": n}

    return loss_fn


def lm_batch(seed: int, b: int = 8, t: int = 12, vocab: int = 128) -> dict:
    r = np.random.default_rng(seed)
    mask = np.ones((b, t), np.int32)
    for i in range(b):
        mask[i, r.integers(4, t + 1) :] = 0
    return {"input_ids": r.integers(0, vocab, (b, t)).astype(np.int32), "mask": mask}
