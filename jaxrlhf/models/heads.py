"""Scalar heads on top of a backbone's final hidden states: reward heads and PPO value heads.

A head is a plain dict ``{"kernel": [E, N], "bias": [N]}`` with logical axes ``("embed", "head_out")`` and
``("head_out",)``, where ``E`` is the width of ``ForwardOutput.hidden`` (OPT with ``word_embed_proj_dim``:
that projection's width) and ``N`` the number of outputs (1 for a reward or value). Applied per token,

    out[b, t] = hidden[b, t] @ kernel + bias                     (PPO values: one per token)

and for a sequence score the hidden state of one token per row is pooled first:

    decoder-only:     t*_b = max { t : mask[b, t] = 1 }, the last real token (left or right padding alike;
                      the same token HF's *ForSequenceClassification uses)
    encoder-decoder:  the decoder is run on the single ``decoder_start_token_id`` after the full input; its
                      hidden state at that first decoder position is the pooled vector (see
                      :func:`jaxrlhf.reward_model.score`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxrlhf.models.spec import ModelSpec


def head_input_dim(spec: ModelSpec) -> int:
    """Width of ``ForwardOutput.hidden`` for ``spec`` (what the head's kernel multiplies)."""
    return spec.word_embed_proj_dim or spec.hidden_size


def init_head(spec: ModelSpec, rng: jax.Array, num_outputs: int = 1, *, dtype: Any = jnp.float32) -> dict:
    """A fresh head: kernel ~ N(0, 1 / (E + 1)) (Stiennon et al. 2020's reward-head init), zero bias."""
    e = head_input_dim(spec)
    kernel = jax.random.normal(rng, (e, num_outputs), jnp.float32) / jnp.sqrt(e + 1.0)
    return {"kernel": kernel.astype(dtype), "bias": jnp.zeros((num_outputs,), dtype)}


def head_axes() -> dict:
    """Logical axis names of a head's leaves (see ``jaxrlhf.sharding.LOGICAL_RULES``)."""
    return {"kernel": ("embed", "head_out"), "bias": ("head_out",)}


def apply_head(head: dict, hidden: jax.Array) -> jax.Array:
    """``hidden [..., E] @ kernel [E, N] + bias [N] -> [..., N]`` in float32."""
    kernel = head["kernel"].astype(jnp.float32)
    return hidden.astype(jnp.float32) @ kernel + head["bias"].astype(jnp.float32)


def token_values(head: dict, hidden: jax.Array) -> jax.Array:
    """Per-token scalar outputs ``[B, T]`` of a one-output head (PPO value head)."""
    return apply_head(head, hidden)[..., 0]


def last_token_index(mask: jax.Array) -> jax.Array:
    """Index ``[B]`` of the last position whose mask is 1 (0 for an all-padding row)."""
    t = jnp.arange(mask.shape[-1], dtype=jnp.int32)
    return jnp.max(jnp.where(mask > 0, t, 0), axis=-1)


def pool_last(hidden: jax.Array, mask: jax.Array) -> jax.Array:
    """Hidden state ``[B, E]`` at each row's last real token (``hidden [B, T, E]``, ``mask [B, T]``)."""
    idx = last_token_index(mask)
    return jnp.take_along_axis(hidden, idx[:, None, None], axis=1)[:, 0]
