"""Per-token entropy of the policy's (temperature-scaled, untruncated) next-token distribution.

For logits z [..., V] and temperature tau, with p = softmax(z / tau):

    H = -sum_v p_v log p_v,      log p = z / tau - logsumexp(z / tau)

(``-sum p log p`` rather than ``lse - sum p z``, which cancels badly at low entropy in float32). Uniform
logits give log V; a one-hot limit gives 0. The PPO entropy bonus is ``-ent_coef * aggregate_loss(H,
mask)``; top-k / top-p truncation of the sampler is not applied, like the log-probs of the update.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_entropy(logits: jax.Array, *, temperature: float = 1.0) -> jax.Array:
    """Entropy [...] (float32, nats) of ``softmax(logits / temperature)`` over the last axis."""
    z = logits.astype(jnp.float32)
    if temperature != 1.0:
        z = z / temperature
    logp = jax.nn.log_softmax(z, axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)
