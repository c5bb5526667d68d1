"""Shared-prompt rows of preference pairs: a pair's chosen and rejected rows as ONE row
``[prompt | chosen response | rejected response]`` (:class:`jaxrlhf.models.PairLayout`), so the prompt is
computed once per pair. Used by the DPO stage (log-probs) and the reward model (scores).

Per pair, s = the leading tokens both rows share outside their losses (the prompt; with a loss mask on the
responses, as every preference loader makes it), a = len(chosen), e = a + len(rejected) - s: the packed row
is ``chosen ++ rejected[s:]``. Its static shape (:class:`PairShape`) comes from the data
(:func:`pair_shape`), one shape per run.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from jaxrlhf import models

__all__ = ["PairShape", "forward_pairs", "pack_pairs", "pair_shape"]


class PairShape(NamedTuple):
    """Static shapes of the shared-prompt pair rows: ``length`` L (packed row: prompt + chosen response +
    rejected response) and ``virtual`` V (the longest single row, prompt + one response; the fused
    attention's rows)."""

    length: int
    virtual: int


def _shared_len(c_ids, c_loss, r_ids, r_loss) -> int:
    """Leading tokens two rows share outside their losses (numpy / lists)."""
    n = min(len(c_ids), len(r_ids))
    c, r = np.asarray(c_ids[:n]), np.asarray(r_ids[:n])
    same = (c == r) & (np.asarray(c_loss[:n]) == 0) & (np.asarray(r_loss[:n]) == 0)
    return int(np.argmin(same)) if not same.all() else n


def pair_shape(ds, round_to: int = 16) -> PairShape:
    """The :class:`PairShape` that holds every pair of the preference dataset ``ds`` and its eval split:
    ``L = max(len_c + len_r - shared)``, ``V = max(len_c, len_r)``, rounded up to ``round_to`` (bounded by
    ``2 T`` and ``T``, T = ``ds.max_length``). Deterministic in the data, so every process of a multi-host
    run (and a resume) compiles the same shape; a streaming dataset (no length) gets the bounds."""
    t = ds.max_length
    parts = [p for p in (ds, ds.eval) if p is not None]
    try:
        sizes = [len(p.data) for p in parts]
    except TypeError:  # streaming: not known before reading
        return PairShape(2 * t, t)
    longest, widest = 1, 1
    cols = ("chosen_input_ids", "chosen_loss_mask", "rejected_input_ids", "rejected_loss_mask")
    for part, n in zip(parts, sizes, strict=True):
        for start in range(0, n, 1024):
            rows = part.data[start : start + 1024]
            for ci, cl, ri, rl in zip(*(rows[c] for c in cols), strict=True):
                shared = _shared_len(ci, cl, ri, rl)
                longest = max(longest, len(ci) + len(ri) - shared)
                widest = max(widest, len(ci), len(ri))

    def up(x, cap):
        return min(-(-x // round_to) * round_to, cap)

    return PairShape(up(longest, 2 * t), up(widest, t))


def pack_pairs(batch: dict, shape: PairShape, pad_token_id: int = 0):
    """A preference batch (``chosen_`` / ``rejected_`` ids, attention and loss masks, ``[B, T]``) as
    shared-prompt rows ``[B, L]``: ``(ids, loss_mask, layout)``.

    Per pair: s = the leading tokens both rows share outside their losses (the prompt), a = len(chosen),
    e = a + len(rejected) - s; the row is ``chosen ++ rejected[s:]`` (``models.PairLayout(s, a, e)``)."""
    c_ids, c_att, c_loss = (batch[f"chosen_{k}"] for k in ("input_ids", "attention_mask", "loss_mask"))
    r_ids, r_att, r_loss = (batch[f"rejected_{k}"] for k in ("input_ids", "attention_mask", "loss_mask"))
    t_in = c_ids.shape[1]
    same = (c_ids == r_ids) & (c_loss == 0) & (r_loss == 0) & (c_att > 0) & (r_att > 0)
    s = jnp.sum(jnp.cumprod(same.astype(jnp.int32), axis=1), axis=1).astype(jnp.int32)
    a = jnp.sum(c_att, axis=1).astype(jnp.int32)
    e = a + jnp.sum(r_att, axis=1).astype(jnp.int32) - s
    t = jnp.arange(shape.length)[None, :]
    src_c = jnp.clip(t, 0, t_in - 1)
    src_r = jnp.clip(s[:, None] + t - a[:, None], 0, t_in - 1)

    def pick(c, r, fill):
        c = jnp.take_along_axis(c, jnp.broadcast_to(src_c, (c.shape[0], shape.length)), axis=1)
        r = jnp.take_along_axis(r, src_r, axis=1)
        return jnp.where(t < a[:, None], c, jnp.where(t < e[:, None], r, fill))

    ids = pick(c_ids, r_ids, pad_token_id)
    loss = pick(c_loss, r_loss, 0)
    return ids, loss, models.PairLayout(s, a, e, virtual_len=shape.virtual)


def forward_pairs(spec, params, batch: dict, shape: PairShape, **forward_kwargs):
    """``models.forward`` over the :func:`pack_pairs` rows of a preference batch (decoder-only): returns
    ``(ids, loss_mask, layout, ForwardOutput)``. ``max_segments`` is dropped: the layout gives the fused
    kernel its rows."""
    pad = spec.pad_token_id if spec.pad_token_id is not None else 0
    ids, loss, layout = pack_pairs(batch, shape, pad)
    forward_kwargs.pop("max_segments", None)
    return ids, loss, layout, models.forward(spec, params, ids, pair_layout=layout, **forward_kwargs)
