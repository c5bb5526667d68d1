"""A tiny MLP 'model' with the same param naming as jaxrlhf models, and a token-mean loss over it."""

import jax
import jax.numpy as jnp
import numpy as np

V, E = 16, 8


def toy_params(seed: int = 0) -> dict:
    k = jax.random.split(jax.random.PRNGKey(seed), 3)
    return {
        "embed_tokens": {"embedding": jax.random.normal(k[0], (V, E)) * 0.1},
        "layers_0": {
            "mlp": {"up_proj": {"kernel": jax.random.normal(k[1], (E, E)) * 0.3, "bias": jnp.zeros((E,))}},
            "input_norm": {"scale": jnp.ones((E,))},
        },
        "lm_head": {"kernel": jax.random.normal(k[2], (E, V)) * 0.3},
    }


def toy_loss(params, frozen, batch, rng):
    """Token-mean cross-entropy over ``mask``; returns the token count as ``weight`` (exact accumulation)."""
    x = params["embed_tokens"]["embedding"][batch["input_ids"]]
    x = x * params["layers_0"]["input_norm"]["scale"]
    up = params["layers_0"]["mlp"]["up_proj"]
    x = x + jnp.tanh(x @ up["kernel"] + up["bias"])
    logits = x @ params["lm_head"]["kernel"]
    logp = jax.nn.log_softmax(logits[:, :-1])
    tgt = batch["input_ids"][:, 1:]
    nll = -jnp.take_along_axis(logp, tgt[..., None], -1)[..., 0]
    m = batch["mask"][:, 1:].astype(jnp.float32)
    n = m.sum()
    return (nll * m).sum() / n, {"weight": n}


def toy_batch(seed: int, b: int = 4, t: int = 6, ragged: bool = True) -> dict:
    r = np.random.default_rng(seed)
    ids = r.integers(0, V, (b, t)).astype(np.int32)
    mask = np.ones((b, t), np.int32)
    if ragged:
        for i in range(b):
            mask[i, r.integers(2, t + 1) :] = 0
    return {"input_ids": ids, "mask": mask}


class CountingSource:
    """Deterministic batch source with the Loader contract: iteration, ``state()`` and ``restore(state)``."""

    def __init__(self, seed: int = 0, **kw):
        self.seed, self.pos, self.kw = seed, 0, kw

    def __iter__(self):
        return self

    def __next__(self):
        batch = toy_batch(self.seed * 100_003 + self.pos, **self.kw)
        self.pos += 1
        return batch

    def state(self) -> dict:
        return {"seed": self.seed, "pos": self.pos}

    def restore(self, state: dict) -> None:
        self.seed, self.pos = int(state["seed"]), int(state["pos"])


def toy_loss_dropout(params, frozen, batch, rng):
    """``toy_loss`` with dropout on the embeddings: the step's RNG matters (resume must restore it)."""
    keep = jax.random.bernoulli(rng, 0.8, (E,))
    p = dict(params)
    p["embed_tokens"] = {"embedding": params["embed_tokens"]["embedding"] * keep / 0.8}
    return toy_loss(p, frozen, batch, rng)
