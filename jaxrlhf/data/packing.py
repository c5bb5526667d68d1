"""Packing of decoder-only SFT examples, length buckets, and padding.

Packing puts several examples in one row of at most ``max_length`` tokens. Each example keeps its own
``segment_ids`` value (1, 2, ... within the row; 0 = padding) and ``positions`` that restart at 0, so with
``models.forward(..., positions=, segment_ids=)`` no token attends across examples and every example sees
exactly the positions it would see alone: the logits of a packed row equal the logits of its examples run
separately. Rows are filled first-fit-decreasing within chunks of examples (deterministic).

Length buckets bound the set of shapes that generation compiles for: a prompt batch is left-padded to the
smallest bucket that holds its longest prompt (powers of two from ``min_bucket`` up to the maximum).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def pack_examples(
    input_ids: Sequence[Sequence[int]],
    loss_mask: Sequence[Sequence[int]],
    max_length: int,
    max_segments: int | None = None,
) -> dict[str, list[list[int]]]:
    """First-fit-decreasing packing -> rows of ``input_ids``, ``loss_mask``, ``segment_ids``, ``positions``
    (and ``num_segments``, the examples in each row: the dataset's bound for the fused attention).

    Every example must have ``len <= max_length``. Within a row examples keep their input order. A row holds
    at most ``max_segments`` examples (None: no limit): the bound ``models.forward(max_segments=)`` is
    given, so the fused attention can take the segments as lengths + offsets.
    """
    if max_segments is not None and max_segments < 1:
        raise ValueError(f"max_segments must be >= 1, got {max_segments}")
    order = sorted(range(len(input_ids)), key=lambda i: (-len(input_ids[i]), i))
    bins: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = len(input_ids[i])
        if n > max_length:
            raise ValueError(f"example of {n} tokens does not fit max_length {max_length}")
        for b, room in enumerate(free):
            if n <= room and (max_segments is None or len(bins[b]) < max_segments):
                bins[b].append(i)
                free[b] -= n
                break
        else:
            bins.append([i])
            free.append(max_length - n)
    out: dict[str, list] = {"input_ids": [], "loss_mask": [], "segment_ids": [], "positions": []}
    for members in sorted(bins, key=min):
        row: dict[str, list[int]] = {k: [] for k in out}
        for seg, i in enumerate(sorted(members), start=1):
            n = len(input_ids[i])
            row["input_ids"] += list(input_ids[i])
            row["loss_mask"] += list(loss_mask[i])
            row["segment_ids"] += [seg] * n
            row["positions"] += list(range(n))
        for k in out:
            out[k].append(row[k])
    out["num_segments"] = [len(members) for members in sorted(bins, key=min)]
    return out


def length_buckets(max_length: int, min_bucket: int = 16) -> tuple[int, ...]:
    """Powers of two from ``min_bucket`` below ``max_length``, then ``max_length`` itself."""
    buckets = []
    b = min_bucket
    while b < max_length:
        buckets.append(b)
        b *= 2
    return tuple(buckets) + (max_length,)


def bucket_for(length: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if length <= b:
            return int(b)
    raise ValueError(f"length {length} exceeds the largest bucket {buckets[-1]}")


def pad_right(seqs: Sequence[Sequence[int]], length: int, value: int = 0) -> np.ndarray:
    """``[B, length]`` int32, each sequence at the start of its row."""
    out = np.full((len(seqs), length), value, dtype=np.int32)
    for b, s in enumerate(seqs):
        out[b, : len(s)] = s
    return out


def pad_left(seqs: Sequence[Sequence[int]], length: int, value: int = 0) -> np.ndarray:
    """``[B, length]`` int32, each sequence at the end of its row."""
    out = np.full((len(seqs), length), value, dtype=np.int32)
    for b, s in enumerate(seqs):
        if len(s):
            out[b, length - len(s) :] = s
    return out
