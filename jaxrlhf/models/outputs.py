"""The result record of every family's ``forward``."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax


class ForwardOutput(NamedTuple):
    """What ``models.forward`` returns.

    logits:         [B, T, V] next-token logits (float32).
    hidden:         [B, T, E] final hidden states after the final norm (T5: before the d_model**-0.5 scaling).
    cache:          the updated KV cache when ``forward`` was called with one, else None.
    encoder_hidden: [B, S, E] encoder outputs (encoder-decoder families only), else None.
    """

    logits: jax.Array
    hidden: jax.Array
    cache: Any = None
    encoder_hidden: jax.Array | None = None
