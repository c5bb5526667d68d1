"""Prompt batches for RL stages, and the host <-> global array moves a rollout needs.

Prompts come from any prompt-bearing dataset format through ``data.build_dataset(kind="prompt")`` (the one
tokenisation path: plain ``prompt`` text; ``messages`` / a ``prompt`` message list through the chat template
with the generation prompt; preference and prompt/completion rows' prompt; alpaca rows' instruction and
input, as the data layer renders them), are length-bucketed
(``DataConfig.bucket_lengths``, default powers of two) and read by :class:`jaxrlhf.data.Loader` (deterministic
order, resumable from ``state()``). Each :class:`PromptBatch` keeps, for this process's rows, the prompt
text, the chat messages and the other source columns (for Python reward functions).

Encoder-decoder policies read the prompt as T5 was trained: text + EOS (the prompt kind yields decoder-only
prompts, ``prefix + text``; the EOS is appended here).

Rows across processes (multi-host): a global array's rows held by this process are
:func:`local_rows` (sorted); :func:`host_array` gathers a global array onto every host
(``multihost_utils.process_allgather``) when it is not fully addressable; :func:`to_global` turns this
process's rows (in :func:`local_rows` order) into a global array with
``jax.make_array_from_process_local_data`` over the mesh's batch axes.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np

from jaxrlhf import data, sharding
from jaxrlhf.data.packing import bucket_for, pad_left

__all__ = ["PromptBatch", "PromptLoader", "build_prompt_loader", "host_array", "local_rows", "to_global"]


class PromptBatch(NamedTuple):
    """A batch of prompts: global arrays plus this process's rows on the host.

    prompt_ids / prompt_mask: [B, P] left-padded (global ``jax.Array`` with a mesh, else numpy).
    prompts:  this process's prompt strings (a chat prompt: the last user message's content; an alpaca
              row: its instruction, and input when there is one).
    messages: the chat prompt as a message list (None for plain-text prompts), for re-tokenisation.
    columns:  every other source column (name -> list, one entry per local row), passed by name to Python
              reward functions (e.g. a reference ``answer``).
    index:    [B_local] source row of each local prompt.
    """

    prompt_ids: Any
    prompt_mask: Any
    prompts: list[str]
    messages: list[list[dict] | None]
    columns: dict[str, list]
    index: np.ndarray


def _chat_messages(row: dict) -> list[dict] | None:
    prompt = row.get("prompt")
    if isinstance(prompt, str):
        return None
    messages = prompt if isinstance(prompt, list) else row.get("messages") or row.get("conversations")
    if not messages:
        return None
    out = [
        {"role": m.get("role", m.get("from")), "content": m.get("content", m.get("value", ""))}
        for m in messages
    ]
    out = [dict(m, role={"human": "user", "gpt": "assistant"}.get(m["role"], m["role"])) for m in out]
    return out[:-1] if out[-1]["role"] == "assistant" else out


def _prompt_text(row: dict, messages: list[dict] | None) -> str:
    if messages is None and "prompt" not in row and "instruction" in row:  # alpaca: instruction (+ input)
        return data.formats.alpaca_user_text(row)
    if messages is None:
        return str(row.get("prompt", ""))
    users = [m["content"] for m in messages if m["role"] == "user"]
    return users[-1] if users else ""


def prompt_batch(
    batch: dict[str, np.ndarray],
    dataset: data.TokenizedDataset,
    *,
    mesh: Any = None,
    eos_token_id: int | None = None,
) -> PromptBatch:
    """A loader batch (``prompt_ids``, ``prompt_mask``, ``index``) -> :class:`PromptBatch`.

    ``eos_token_id`` given (encoder-decoder policies): each prompt gets it appended, re-padded on the left.
    """
    ids, mask = np.asarray(batch["prompt_ids"]), np.asarray(batch["prompt_mask"])
    if eos_token_id is not None:
        rows = [list(r[m > 0]) + [int(eos_token_id)] for r, m in zip(ids, mask, strict=True)]
        longest = max(map(len, rows))
        width = bucket_for(longest, dataset.buckets) if longest <= dataset.buckets[-1] else longest
        ids = pad_left(rows, width, dataset.pad_token_id)
        mask = pad_left([[1] * len(r) for r in rows], width, 0)
    if jax.process_count() > 1:  # each host bucketed its own rows: agree on one width for the global array
        width = sharding.global_max(ids.shape[1])
        if width > ids.shape[1]:
            pad = width - ids.shape[1]
            ids = np.pad(ids, ((0, 0), (pad, 0)), constant_values=dataset.pad_token_id)
            mask = np.pad(mask, ((0, 0), (pad, 0)))
    index = np.asarray(batch["index"])
    raws = [dataset.raw[int(i)] for i in index]
    messages = [_chat_messages(r) for r in raws]
    names = [k for k in (raws[0] if raws else {}) if k != "prompt"]
    columns = {k: [r.get(k) for r in raws] for k in names}
    texts = [_prompt_text(r, m) for r, m in zip(raws, messages, strict=True)]
    return PromptBatch(to_global(ids, mesh), to_global(mask, mesh), texts, messages, columns, index)


class PromptLoader:
    """Iterate :class:`PromptBatch` es of a prompt-kind dataset; ``state()`` / ``restore()`` resume exactly.

    ``batch_size`` is global (each process yields its ``batch_size / process_count`` rows).
    """

    def __init__(
        self,
        dataset: data.TokenizedDataset,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        mesh: Any = None,
        eos_token_id: int | None = None,
        num_epochs: int | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        if dataset.kind != "prompt":
            raise ValueError(f"PromptLoader needs a kind='prompt' dataset, got kind={dataset.kind!r}")
        self.dataset, self.mesh, self.eos_token_id = dataset, mesh, eos_token_id
        self.loader = data.Loader(
            dataset, batch_size, seed, shuffle, process_index, process_count, num_epochs=num_epochs
        )

    def state(self) -> dict[str, int]:
        return self.loader.state()

    def restore(self, state: dict[str, int]) -> None:
        self.loader.restore(state)

    def __iter__(self) -> PromptLoader:
        return self

    def __next__(self) -> PromptBatch:
        batch = next(self.loader)
        return prompt_batch(batch, self.dataset, mesh=self.mesh, eos_token_id=self.eos_token_id)


def build_prompt_loader(
    config: data.DataConfig, tokenizer, *, mesh: Any = None, encoder_decoder: bool = False, **kwargs: Any
) -> PromptLoader:
    """``data.build_dataset(config, tokenizer, kind="prompt")`` read by a :class:`PromptLoader` with the
    config's ``batch_size`` / ``seed`` / ``shuffle``; ``encoder_decoder`` appends the tokenizer's EOS."""
    ds = data.build_dataset(config, tokenizer, kind="prompt")
    eos = tokenizer.eos_token_id if encoder_decoder else None
    return PromptLoader(
        ds, config.batch_size, seed=config.seed, shuffle=config.shuffle, mesh=mesh, eos_token_id=eos, **kwargs
    )


# ---------------------------------------------------------------------------------------------- host rows


def local_rows(x: Any) -> np.ndarray:
    """Sorted global row indices of ``x`` that this process holds (all rows in a single process)."""
    if not isinstance(x, jax.Array) or jax.process_count() == 1:
        return np.arange(np.shape(x)[0])
    rows = set()
    for shard in x.addressable_shards:
        rows.update(range(*shard.index[0].indices(x.shape[0])))
    return np.asarray(sorted(rows))


host_array = sharding.host_array  # whole arrays on this host, gathered across processes when needed


def to_global(local: np.ndarray, mesh: Any) -> Any:
    """This process's rows -> a global array batch-sharded over ``mesh`` (numpy as-is without a mesh)."""
    if mesh is None:
        if jax.process_count() > 1:
            raise ValueError("to_global: several processes need a mesh to build global arrays")
        return np.asarray(local)
    from jaxrlhf.sharding import batch_sharding

    local = np.asarray(local)
    return jax.make_array_from_process_local_data(batch_sharding(mesh, local.ndim), local)
