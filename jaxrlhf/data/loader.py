"""A deterministic, resumable, host-sharded batch iterator, and global arrays from per-host batches.

Order: epoch ``e`` visits the examples in ``permutation(seed, e)`` (``numpy.random.default_rng([seed, e])``;
identity when ``shuffle=False``). Global batch ``k`` of the epoch is the slice ``[k*B, (k+1)*B)`` of that
order (``B`` = global ``batch_size``); process ``p`` of ``P`` takes rows ``[p*B/P, (p+1)*B/P)`` of it, so the
hosts read disjoint slices that together make the global batch. The last ``N mod B`` examples of each epoch
are dropped (a different set each epoch) so that every step has the same shape on every host.

State: ``{"epoch", "step", "seed"}`` — three integers to store in the checkpoint. ``restore(state)`` and
iterating yields exactly the batches an uninterrupted run would have yielded next. Streaming datasets are
shuffled with a seeded buffer per epoch, split across hosts with ``split_dataset_by_node``, and resumed by
skipping the examples already consumed in the epoch. A streaming dataset of several files (one shard each,
see :mod:`jaxrlhf.data.sources`) is split by files when their number divides by the process count: each
process then reads only its own files (the shard order shuffled the same way on every process, so together
they read every file once per epoch). Otherwise every process reads every file and keeps one example in
``P`` (disjoint and complete as well, with ``P`` times the reading); a warning says so.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np

from jaxrlhf.data.packing import bucket_for, pad_left, pad_right

logger = logging.getLogger("jaxrlhf.data")


def collate(examples: list[dict[str, Any]], dataset) -> dict[str, np.ndarray]:
    """Examples of ``dataset.kind`` -> one numpy batch (layouts in :mod:`jaxrlhf.data.formats`)."""
    kind, pad = dataset.kind, dataset.pad_token_id
    if kind == "sft":
        T = dataset.buckets[-1]
        ids = [e["input_ids"] for e in examples]
        lengths = [len(x) for x in ids]
        batch = {
            "input_ids": pad_right(ids, T, pad),
            "attention_mask": pad_right([[1] * n for n in lengths], T, 0),
            "loss_mask": pad_right([e["loss_mask"] for e in examples], T, 0),
        }
        if dataset.packed:
            batch["positions"] = pad_right([e["positions"] for e in examples], T, 0)
            batch["segment_ids"] = pad_right([e["segment_ids"] for e in examples], T, 0)
        else:
            batch["positions"] = pad_right([list(range(n)) for n in lengths], T, 0)
            batch["segment_ids"] = batch["attention_mask"].copy()
        return batch
    if kind == "preference":
        T = dataset.buckets[-1]
        batch = {}
        for side in ("chosen", "rejected"):
            ids = [e[f"{side}_input_ids"] for e in examples]
            batch[f"{side}_input_ids"] = pad_right(ids, T, pad)
            batch[f"{side}_attention_mask"] = pad_right([[1] * len(x) for x in ids], T, 0)
            batch[f"{side}_loss_mask"] = pad_right([e[f"{side}_loss_mask"] for e in examples], T, 0)
        batch["margin"] = np.asarray([e["margin"] for e in examples], np.float32)
        for name in ("ref_chosen_logps", "ref_rejected_logps"):  # DPO's precomputed reference log-probs
            if name in examples[0]:
                batch[name] = np.asarray([e[name] for e in examples], np.float32)
        return batch
    if kind == "prompt":
        ids = [e["prompt_ids"] for e in examples]
        P = bucket_for(max(len(x) for x in ids), dataset.buckets)
        return {
            "prompt_ids": pad_left(ids, P, pad),
            "prompt_mask": pad_left([[1] * len(x) for x in ids], P, 0),
            "index": np.asarray([e["index"] for e in examples], np.int32),
        }
    if kind == "seq2seq":
        S, T = dataset.buckets
        inputs = [e["input_ids"] for e in examples]
        labels = [e["labels"] for e in examples]
        dec = [[dataset.decoder_start_token_id] + x[:-1] for x in labels]
        return {
            "input_ids": pad_right(inputs, S, pad),
            "attention_mask": pad_right([[1] * len(x) for x in inputs], S, 0),
            "decoder_input_ids": pad_right(dec, T, pad),
            "decoder_attention_mask": pad_right([[1] * len(x) for x in labels], T, 0),
            "labels": pad_right(labels, T, pad),
            "loss_mask": pad_right([[1] * len(x) for x in labels], T, 0),
        }
    raise ValueError(f"unknown dataset kind {kind!r}")


class Loader:
    """Iterate numpy batches of a :class:`~jaxrlhf.data.dataset.TokenizedDataset` (see the module docstring).

    ``batch_size`` is global; each process yields ``batch_size // process_count`` rows. ``process_index`` /
    ``process_count`` default to ``jax.process_index()`` / ``jax.process_count()``. ``num_epochs=None``
    iterates forever.
    """

    def __init__(
        self,
        dataset,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        process_index: int | None = None,
        process_count: int | None = None,
        *,
        num_epochs: int | None = None,
        shuffle_buffer: int = 10_000,
    ):
        if process_index is None or process_count is None:
            import jax

            process_index, process_count = jax.process_index(), jax.process_count()
        if batch_size % process_count:
            raise ValueError(f"batch_size {batch_size} is not divisible by process_count {process_count}")
        self.dataset, self.batch_size, self.seed, self.shuffle = dataset, batch_size, seed, shuffle
        self.process_index, self.process_count, self.num_epochs = process_index, process_count, num_epochs
        self.local_batch_size = batch_size // process_count
        self.shuffle_buffer = shuffle_buffer
        self.streaming = not hasattr(dataset.data, "__len__")
        if not self.streaming and len(dataset.data) < batch_size:
            raise ValueError(
                f"dataset has {len(dataset.data)} examples, fewer than one batch of {batch_size}"
            )
        self.epoch, self.step = 0, 0
        self._stream: Iterator | None = None

    @classmethod
    def from_config(cls, dataset, config, **kwargs) -> Loader:
        """A loader with a DataConfig's ``batch_size``, ``seed``, ``shuffle`` and ``shuffle_buffer``."""
        kwargs.setdefault("shuffle_buffer", config.shuffle_buffer)
        return cls(dataset, config.batch_size, config.seed, config.shuffle, **kwargs)

    # ------------------------------------------------------------------------------------------- state
    def state(self) -> dict[str, int]:
        return {"epoch": int(self.epoch), "step": int(self.step), "seed": int(self.seed)}

    def restore(self, state: dict[str, int]) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(f"loader state has seed {state['seed']}, this loader {self.seed}")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self._stream = None

    @property
    def steps_per_epoch(self) -> int | None:
        return None if self.streaming else len(self.dataset.data) // self.batch_size

    def epoch_order(self, epoch: int) -> np.ndarray:
        n = len(self.dataset.data)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    # --------------------------------------------------------------------------------------- iteration
    def __iter__(self) -> Loader:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.num_epochs is not None and self.epoch >= self.num_epochs:
            raise StopIteration
        examples = self._next_streaming() if self.streaming else self._next_map_style()
        if examples is None:  # epoch over (streaming)
            self.epoch, self.step, self._stream = self.epoch + 1, 0, None
            return next(self)
        self.step += 1
        if not self.streaming and self.step >= self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        return collate(examples, self.dataset)

    def _next_map_style(self) -> list[dict]:
        order = self.epoch_order(self.epoch)
        start = self.step * self.batch_size + self.process_index * self.local_batch_size
        rows = order[start : start + self.local_batch_size]
        cols = self.dataset.data[[int(i) for i in rows]]  # one columnar read per batch
        return [dict(zip(cols, values, strict=True)) for values in zip(*cols.values(), strict=True)]

    def _next_streaming(self) -> list[dict] | None:
        if self._stream is None:
            from datasets.distributed import split_dataset_by_node

            ds = self.dataset.data
            shards = ds.num_shards
            if self.process_count > 1 and shards % self.process_count and self.epoch == 0 and not self.step:
                p = self.process_count
                logger.warning(
                    "streaming data: %d shard(s) (files) do not divide over %d processes, so every process "
                    "reads every file and keeps 1 example in %d; give a multiple of %d files to read "
                    "disjoint files", shards, p, p, p,
                )  # fmt: skip
            if self.shuffle:
                ds = ds.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
                ds.set_epoch(self.epoch)
            ds = split_dataset_by_node(ds, rank=self.process_index, world_size=self.process_count)
            if self.step:
                ds = ds.skip(self.step * self.local_batch_size)
            self._stream = iter(ds)
        examples = []
        for example in self._stream:
            examples.append(example)
            if len(examples) == self.local_batch_size:
                return examples
        return None


def to_global(batch: dict[str, np.ndarray], mesh) -> dict[str, Any]:
    """Per-process batch -> global ``jax.Array``s sharded over the mesh's batch axes (``data``, ``fsdp``).

    Each process passes its own rows; the global leading dimension is ``local * process_count``.
    """
    import jax

    from jaxrlhf.sharding import batch_sharding

    return {
        k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
        for k, v in batch.items()
    }
