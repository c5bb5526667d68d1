"""Optimizers and learning-rate schedules from one frozen :class:`OptimConfig`.

``make_optimizer(cfg)`` returns an ``optax.GradientTransformation``:

    clip_by_global_norm(clip_norm)  ->  adamw | adafactor | sgd (lr = make_schedule(cfg), decay mask)

Gradient accumulation is *not* an optax wrapper here: the train step scans over ``cfg.grad_accum``
micro-batches and applies the optimizer once (see :mod:`jaxrlhf.train.step`), so clipping and the update see
the averaged gradient of the whole batch, exactly as one big batch would.

Schedules (``s`` = optimizer step, ``W`` = warmup_steps, ``S`` = total_steps, ``r`` = min_lr_ratio)::

    s < W:      lr(s) = lr * s / W                                     (HF get_*_schedule_with_warmup)
    constant:   lr(s) = lr
    linear:     lr(s) = lr * (r + (1 - r) * (1 - p))                    p = clip((s - W) / (S - W), 0, 1)
    cosine:     lr(s) = lr * (r + (1 - r) * 0.5 * (1 + cos(pi * p)))

``with_lr_scale(opt)`` appends a factor kept in the optimizer state (``LRScaleState.scale``, 1 at first) that
multiplies every update, i.e. the learning rate (decoupled weight decay included, as optax scales it by the
learning rate too); :func:`scale_lr` changes it between steps without recompiling, and because it lives in
the optimizer state a checkpoint restores it (the RL stages' ``train.kl_action=lower_lr``).

Weight decay (decoupled, AdamW) applies to matrices (``kernel``, ``lora_a``, ``lora_b``) only; norms'
``scale`` and every ``bias`` are excluded, and so are embedding tables (``embedding``) unless
``decay_embeddings``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("adamw", "adafactor", "sgd")
SCHEDULES = ("constant", "linear", "cosine")

_DECAY_LEAVES = ("kernel", "lora_a", "lora_b")
_NO_DECAY_LEAVES = ("scale", "bias")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimizer hyper-parameters (hashable; never passed into jitted code)."""

    name: str = "adamw"
    lr: float = 1e-5
    schedule: str = "cosine"
    warmup_steps: int = 0
    total_steps: int = 1000
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    momentum: float = 0.0  # sgd only
    clip_norm: float | None = 1.0  # None or <= 0: no clipping
    grad_accum: int = 1
    decay_embeddings: bool = False
    mu_dtype: str | None = None  # e.g. "bfloat16" to halve AdamW's first-moment memory

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise ValueError(f"OptimConfig.name must be one of {OPTIMIZERS}, got {self.name!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"OptimConfig.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.grad_accum < 1:
            raise ValueError(f"OptimConfig.grad_accum must be >= 1, got {self.grad_accum}")
        if self.warmup_steps < 0 or self.total_steps < 1:
            raise ValueError(
                f"need warmup_steps >= 0 and total_steps >= 1, got {self.warmup_steps}, {self.total_steps}"
            )

    def replace(self, **kw: Any) -> OptimConfig:
        return dataclasses.replace(self, **kw)


def make_schedule(cfg: OptimConfig) -> optax.Schedule:
    """``step -> learning rate`` (jittable), warm-up then constant / linear / cosine decay; see module doc."""
    peak, warm, total, r = cfg.lr, cfg.warmup_steps, cfg.total_steps, cfg.min_lr_ratio
    decay_len = max(total - warm, 1)

    def schedule(step):
        s = jnp.asarray(step, jnp.float32)
        warm_lr = peak * s / max(warm, 1)
        p = jnp.clip((s - warm) / decay_len, 0.0, 1.0)
        if cfg.schedule == "constant":
            frac = jnp.ones_like(p)
        elif cfg.schedule == "linear":
            frac = 1.0 - p
        else:
            frac = 0.5 * (1.0 + jnp.cos(jnp.pi * p))
        after = peak * (r + (1.0 - r) * frac)
        return jnp.where(s < warm, warm_lr, after)

    return schedule


def _leaf_name(path: tuple) -> str:
    last = path[-1]
    return str(getattr(last, "key", getattr(last, "name", last)))


def decay_mask(params: Any, *, decay_embeddings: bool = False) -> Any:
    """Tree of bools, True where weight decay applies (matrices; embeddings if asked; no norms/biases)."""

    def decide(path, x):
        name = _leaf_name(path)
        if name in _DECAY_LEAVES:
            return True
        if name == "embedding":
            return decay_embeddings
        if name in _NO_DECAY_LEAVES:
            return False
        return jnp.ndim(x) >= 2  # unknown leaves (e.g. heads): decay matrices only

    return jax.tree_util.tree_map_with_path(decide, params)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """``optax`` chain for ``cfg``: global-norm clipping, then the optimizer with schedule and decay mask."""
    lr = make_schedule(cfg)
    mask = lambda p: decay_mask(p, decay_embeddings=cfg.decay_embeddings)
    if cfg.name == "adamw":
        opt = optax.adamw(
            lr,
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=mask,
            mu_dtype=jnp.dtype(cfg.mu_dtype) if cfg.mu_dtype else None,
        )
    elif cfg.name == "adafactor":
        opt = optax.adafactor(
            lr,
            weight_decay_rate=cfg.weight_decay or None,
            weight_decay_mask=mask,
            multiply_by_parameter_scale=False,
        )
    else:
        parts = [optax.sgd(lr, momentum=cfg.momentum or None)]
        if cfg.weight_decay:
            # update = -lr(s) * (g + weight_decay * p): for plain SGD this is L2 and decoupled decay at once
            parts.insert(0, optax.masked(optax.add_decayed_weights(cfg.weight_decay), mask))
        opt = optax.chain(*parts)
    if cfg.clip_norm is not None and cfg.clip_norm > 0:
        opt = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), opt)
    return opt


class LRScaleState(NamedTuple):
    """State of :func:`with_lr_scale`: ``scale`` (f32 []) multiplies every update of the optimizer."""

    scale: jax.Array


def with_lr_scale(opt: optax.GradientTransformation) -> optax.GradientTransformation:
    """``opt`` followed by a multiplication of its updates by ``LRScaleState.scale`` (1 at init): the
    learning rate times a factor that :func:`scale_lr` changes between steps (module docstring)."""

    def init(params):
        del params
        return LRScaleState(jnp.ones((), jnp.float32))

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u: (u * state.scale).astype(u.dtype), updates), state

    return optax.chain(opt, optax.GradientTransformation(init, update))


def _is_scale(x: Any) -> bool:
    return isinstance(x, LRScaleState)


def scale_lr(opt_state: Any, factor: float) -> Any:
    """``opt_state`` (of an optimizer made by :func:`with_lr_scale`) with its learning-rate factor multiplied
    by ``factor``; each new factor keeps its array's sharding. Raises ValueError without a factor."""
    if not any(_is_scale(x) for x in jax.tree.leaves(opt_state, is_leaf=_is_scale)):
        raise ValueError("scale_lr: the optimizer was not made with with_lr_scale")

    def one(x):
        if not _is_scale(x):
            return x
        new = (x.scale * jnp.float32(factor)).astype(jnp.float32)
        sharding = getattr(x.scale, "sharding", None)
        return LRScaleState(jax.device_put(new, sharding) if sharding is not None else new)

    return jax.tree.map(one, opt_state, is_leaf=_is_scale)


def lr_scale(opt_state: Any) -> float | None:
    """The learning-rate factor of ``opt_state`` (:func:`with_lr_scale`), None when it has none."""
    for x in jax.tree.leaves(opt_state, is_leaf=_is_scale):
        if _is_scale(x):
            return float(jax.device_get(x.scale))
    return None
