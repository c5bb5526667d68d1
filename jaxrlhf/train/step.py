"""One train step: micro-batch gradient accumulation by ``lax.scan``, then one optimizer update.

``loss_fn(params, frozen, batch, rng) -> (loss, metrics)`` is any pure function (SFT, reward, DPO, ...);
``metrics`` is a dict of scalars. If it holds ``"weight"`` (e.g. the number of target tokens of a token-mean
loss), micro-batches are combined by that weight, so that ``grad_accum`` micro-batches give *exactly* the
gradient of one big batch:

    L = sum_i w_i L_i / sum_i w_i,        g = sum_i w_i grad L_i / sum_i w_i

(without ``"weight"``, ``w_i = 1``). With ``grad_accum = k > 1`` every batch leaf has a leading micro-batch
axis: ``input_ids [k, B, T]``; with ``k = 1`` leaves are plain ``[B, T]`` and the step differentiates ``L``
itself (the same gradient; its backward starts from the literal cotangent 1).

Usage::

    step = make_train_step(loss_fn, make_optimizer(cfg), grad_accum=cfg.grad_accum,
                           schedule=make_schedule(cfg), param_compute_dtype=jnp.bfloat16)
    step = jit_train_step(step, shardings, mesh=mesh, frozen_shardings=base_shardings)
    state, metrics = step(state, batch, frozen)   # metrics: loss, grad_norm, lr, + loss_fn's metrics

``frozen`` (the base model under LoRA, a reference model, ... or None) is an argument of the step, not part
of the state: the state is donated, ``frozen`` is not, so other computations (the sampler, a reference
forward, a reward model) can keep using the same arrays after the step.

``param_compute_dtype`` casts the trainable params once per step (before the micro-batch scan) so a bf16
forward works on f32 master weights; the gradient flows back through the cast in f32.

Divergence guard (``skip_nonfinite=True``, the default): when the loss or the gradient norm is not finite
(NaN / inf in any micro-batch) or the batch's total weight is 0 (no loss tokens), the step keeps the params
and optimizer state it was given, advances ``step`` and the RNG (the batch is consumed, the schedule moves
on) and reports ``skipped = 1.0`` (else ``0.0``) in its metrics; :func:`jaxrlhf.train.loop.train_loop`
counts the skips and stops the run after ``max_nonfinite_steps`` of them in a row. A finite step is the
unguarded update (up to float rounding:
XLA fuses the select into the update, which may reorder it by an ulp).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from jaxrlhf import sharding
from jaxrlhf.train.state import TrainState

LossFn = Callable[[Any, Any, Any, jax.Array], tuple[jax.Array, dict]]


def cast_floating(tree: Any, dtype: Any) -> Any:
    """Cast floating leaves of ``tree`` to ``dtype`` (integers and keys untouched)."""
    if dtype is None:
        return tree
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _grads_one(loss_fn: LossFn, params, frozen, batch, rng, compute_dtype, weighted: bool = True):
    """``(grads, loss, metrics, w)`` of one (micro-)batch. ``weighted``: the gradient of ``loss * w`` (the
    micro-batches' sum, divided by their total weight later); else of ``loss`` itself — the same for one
    batch, and the loss's own backward then starts from the literal cotangent 1, which XLA folds away
    (``losses.chunked_sft_loss`` returns gradients already scaled for its mean: no extra pass over them)."""

    def wrapped(p):
        loss, metrics = loss_fn(cast_floating(p, compute_dtype), frozen, batch, rng)
        w = jnp.asarray(metrics.get("weight", 1.0), jnp.float32)
        out = loss.astype(jnp.float32)
        return (out * w if weighted else out), (loss, metrics, w)

    (_, (loss, metrics, w)), g = jax.value_and_grad(wrapped, has_aux=True)(params)
    return g, loss, metrics, w


def make_train_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    grad_accum: int = 1,
    schedule: Callable[[jax.Array], jax.Array] | None = None,
    param_compute_dtype: Any = None,
    skip_nonfinite: bool = True,
) -> Callable[[TrainState, Any], tuple[TrainState, dict]]:
    """Pure ``step(state, batch, frozen=None) -> (state, metrics)``; jit it with :func:`jit_train_step`.

    ``skip_nonfinite``: a step whose loss or gradient is not finite leaves params and optimizer state as they
    were and reports ``metrics["skipped"] = 1.0`` (see the module docstring)."""

    def step(state: TrainState, batch: Any, frozen: Any = None) -> tuple[TrainState, dict]:
        rng, step_rng = jax.random.split(state.rng)
        if grad_accum == 1:
            g, loss, metrics, w = _grads_one(
                loss_fn, state.params, frozen, batch, step_rng, param_compute_dtype, weighted=False
            )
            grads = jax.tree.map(lambda x: x.astype(jnp.float32), g)
            metrics = {**metrics, "loss": loss}
            w_total = w
        else:

            def body(carry, xs):
                g_acc, m_acc, w_acc = carry
                i, micro = xs
                g, loss, m, w = _grads_one(
                    loss_fn,
                    state.params,
                    frozen,
                    micro,
                    jax.random.fold_in(step_rng, i),
                    param_compute_dtype,
                )
                m = {**m, "loss": loss}
                g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
                m_acc = jax.tree.map(lambda a, b: a + w * jnp.asarray(b, jnp.float32), m_acc, m)
                return (g_acc, m_acc, w_acc + w), None

            m_shape = jax.eval_shape(
                lambda: _grads_one(
                    loss_fn,
                    state.params,
                    frozen,
                    jax.tree.map(lambda x: x[0], batch),
                    step_rng,
                    param_compute_dtype,
                )
            )
            m0 = {k: jnp.zeros((), jnp.float32) for k in {**m_shape[2], "loss": None}}
            g0 = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
            (g_sum, m_sum, w_sum), _ = jax.lax.scan(
                body, (g0, m0, jnp.zeros((), jnp.float32)), (jnp.arange(grad_accum), batch)
            )
            grads = jax.tree.map(lambda x: x / w_sum, g_sum)
            metrics = {k: v / w_sum for k, v in m_sum.items()}
            w_total = w_sum
            if "weight" in metrics:
                metrics["weight"] = w_sum
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics["grad_norm"] = optax.tree.norm(grads)
        if skip_nonfinite:
            # a batch of weight 0 (no loss tokens) is skipped, not applied as a zero-gradient update
            finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"]) & (w_total > 0)
            params, opt_state = where_tree(finite, (params, opt_state), (state.params, state.opt_state))
            metrics["skipped"] = 1.0 - finite.astype(jnp.float32)
        if schedule is not None:
            metrics["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
        new_state = TrainState(state.step + 1, params, opt_state, rng)
        return new_state, metrics

    return step


def where_tree(ok: jax.Array, new: Any, old: Any) -> Any:
    """``new`` where the scalar ``ok`` holds, else ``old`` (leafwise ``jnp.where``; fuses into the update)."""
    return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def batch_shardings(batch: Any, mesh: Mesh, grad_accum: int = 1) -> Any:
    """Per-leaf shardings: the batch dim (axis 0, or 1 under grad accumulation) over (data, fsdp)."""

    def one(x):
        lead = (None,) if grad_accum > 1 else ()
        names = lead + ("batch",) + (None,) * (x.ndim - 1 - len(lead))
        return NamedSharding(mesh, sharding.logical_to_spec(names, mesh, x.shape))

    return jax.tree.map(one, batch)


def jit_train_step(
    step: Callable[..., tuple[Any, dict]],
    shardings: Any = None,
    *,
    mesh: Mesh | None = None,
    grad_accum: int = 1,
    donate: bool = True,
    frozen_shardings: Any = None,
) -> Callable[..., tuple[Any, dict]]:
    """``call(state, batch, frozen=None)``: ``jax.jit(step, in_shardings=(state, batch, frozen),
    out_shardings=(state, replicated), donate_argnums=0)`` — the state is donated, ``frozen`` never is.

    ``shardings`` mirrors the state (any pytree, e.g. :class:`TrainState` of NamedShardings);
    ``frozen_shardings`` mirrors ``frozen`` (None: the frozen arrays' own shardings are kept). Batch
    shardings are derived from the first batch's shapes (cached per tree structure); the trace runs under
    ``sharding.use_mesh(mesh)`` so the model's activation constraints apply. Without ``mesh``, a plain jit
    with a donated state.
    """
    donate_args = (0,) if donate else ()
    if mesh is None:
        return jax.jit(step, donate_argnums=donate_args)
    rep = sharding.replicated(mesh)
    cache: dict = {}

    def call(state: Any, batch: Any, frozen: Any = None):
        key = (
            jax.tree.structure(batch),
            tuple(jnp.ndim(x) for x in jax.tree.leaves(batch)),
            jax.tree.structure(frozen),
        )
        if key not in cache:
            b_sh = batch_shardings(batch, mesh, grad_accum)
            f_sh = frozen_shardings
            if f_sh is None:
                f_sh = jax.tree.map(lambda x: x.sharding, frozen) if frozen is not None else None
            cache[key] = jax.jit(
                step,
                in_shardings=(shardings, b_sh, f_sh),
                out_shardings=(shardings, rep),
                donate_argnums=donate_args,
            )
        with sharding.use_mesh(mesh):
            return cache[key](state, batch, frozen)

    return call


def make_eval_step(loss_fn: LossFn, *, param_compute_dtype: Any = None) -> Callable[..., dict]:
    """Jitted ``eval(state, batch, frozen=None) -> metrics`` (``loss`` and ``weight``; no dropout rng: a
    fixed key)."""

    def ev(state: TrainState, batch: Any, frozen: Any = None) -> dict:
        loss, metrics = loss_fn(
            cast_floating(state.params, param_compute_dtype), frozen, batch, jax.random.PRNGKey(0)
        )
        return {**metrics, "loss": loss, "weight": jnp.asarray(metrics.get("weight", 1.0), jnp.float32)}

    return jax.jit(ev)
