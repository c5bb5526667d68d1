"""The train state and its shardings.

``TrainState(step, params, opt_state, rng)``:

- ``params``: the *trainable* tree (the whole model for full fine-tuning; the LoRA adapters when training
  adapters), the only tree the optimizer sees;
- ``opt_state``: ``optimizer.init(params)``; ``step``: int32 scalar; ``rng``: raw uint32 key ``[2]``
  (``jax.random.PRNGKey`` layout, so checkpoints hold plain integers).

What is not trained (the frozen base under LoRA, a reference model, a reward model) is *not* part of the
state: it is a separate argument of the jitted step (``step(state, batch, frozen)``) that is not donated, so
the sampler, the reference and the reward model can share it, and train checkpoints do not copy it.
RL stages keep their own NamedTuple states (policy + critic + optimizer states, KL controller, ...); the
checkpoint manager saves any NamedTuple / pytree state.

Shardings come from logical axes (``models.param_axes(spec)``, ``lora.param_axes(...)``) through
:mod:`jaxrlhf.sharding`; optimizer moments take the sharding of the parameter they mirror (matched by their
trailing dict path and shape), everything else in the optimizer state is replicated.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from jaxrlhf import sharding


class TrainState(NamedTuple):
    step: jax.Array  # int32 []
    params: Any  # trainable pytree
    opt_state: Any
    rng: jax.Array  # uint32 [2]


def _raw_key(rng: jax.Array | int) -> jax.Array:
    if isinstance(rng, int):
        return jax.random.PRNGKey(rng)
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(rng)
    return jnp.asarray(rng, jnp.uint32)


def _dict_suffix(path: tuple) -> tuple[str, ...]:
    """Trailing run of dict keys of a tree path (``opt_state[1][0].mu["layers_0"]["attn"]`` -> dict part)."""
    out: list[str] = []
    for k in reversed(path):
        if isinstance(k, jax.tree_util.DictKey):
            out.append(str(k.key))
        else:
            break
    return tuple(reversed(out))


def opt_state_shardings(opt_state: Any, params: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for an (abstract) optimizer state: a leaf whose trailing dict path and shape equal a
    parameter's gets that parameter's sharding (AdamW ``mu``/``nu``); the rest (counts, Adafactor's
    factored rows/cols) is replicated."""
    by_path = {}
    flat_p = jax.tree_util.tree_flatten_with_path(params)[0]
    flat_s = jax.tree.leaves(param_shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    for (path, p), s in zip(flat_p, flat_s, strict=True):
        by_path[_dict_suffix(path)] = (tuple(p.shape), s)
    rep = sharding.replicated(mesh)

    def pick(path, x):
        hit = by_path.get(_dict_suffix(path))
        if hit is not None and hit[0] == tuple(x.shape):
            return hit[1]
        return rep

    return jax.tree_util.tree_map_with_path(pick, opt_state)


def state_shardings(state: TrainState, mesh: Mesh, params_axes: Any) -> TrainState:
    """TrainState of NamedShardings for ``state`` (arrays or ShapeDtypeStructs) on ``mesh``."""
    rep = sharding.replicated(mesh)
    p_sh = sharding.named_shardings(params_axes, mesh, state.params)
    o_sh = opt_state_shardings(state.opt_state, state.params, p_sh, mesh)
    return TrainState(step=rep, params=p_sh, opt_state=o_sh, rng=rep)


def init_train_state(
    params: Any,
    optimizer: optax.GradientTransformation,
    rng: jax.Array | int,
    *,
    mesh: Mesh | None = None,
    params_axes: Any = None,
) -> tuple[TrainState, TrainState | None]:
    """Build ``(state, shardings)``. With ``mesh`` the state is placed by its logical axes (the optimizer
    state is created directly sharded); without, ``shardings`` is None and arrays stay where they are.

    The state may share buffers with ``params``; a jitted step donates its state, so after the first step
    those input arrays are invalid (pass copies if you still need them).
    """
    key = _raw_key(rng)
    if mesh is None:
        state = TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params), key)
        return state, None
    if params_axes is None:
        raise ValueError("init_train_state(mesh=...) needs params_axes")
    abstract = jax.eval_shape(
        lambda p: TrainState(jnp.zeros((), jnp.int32), p, optimizer.init(p), key), params
    )
    shard = state_shardings(abstract, mesh, params_axes)
    params = jax.device_put(params, shard.params)
    opt_state = jax.jit(optimizer.init, out_shardings=shard.opt_state)(params)
    state = TrainState(
        jax.device_put(jnp.zeros((), jnp.int32), shard.step),
        params,
        opt_state,
        jax.device_put(key, shard.rng),
    )
    return state, shard


def abstract_state(state: Any, shardings: Any = None) -> Any:
    """ShapeDtypeStructs of ``state`` (any pytree; with ``shardings`` attached when given): a restore
    target."""
    if shardings is None:
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), state
        )
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
