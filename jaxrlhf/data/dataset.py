"""``DataConfig`` and ``build_dataset``: files -> rows -> tokenized (and packed) examples, through
``datasets.map(batched=True)`` with a deterministic fingerprint, so a second run reads the cache.

Bad rows (see :mod:`jaxrlhf.data.errors`) raise one :class:`DataError` naming file, row, 1-based line and
field of every bad row of a file (up to ``MAX_REPORTED``, then how many more: the whole file is checked
first; a streaming read stops at the first), or under ``on_bad_row="skip"`` are dropped, counted in
``TokenizedDataset.skipped`` and logged. Rows that do not fit under ``truncation="drop"`` are dropped and
counted the same way whatever ``on_bad_row`` says.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

from jaxrlhf.data.errors import (
    MAX_REPORTED,
    BadRowLog,
    DataError,
    bad_rows_error,
    check_on_bad_row,
    logger,
)
from jaxrlhf.data.formats import (
    FORMATS,
    KIND_FORMATS,
    KINDS,
    TRUNCATIONS,
    RowError,
    detect_format,
    process_row,
    required_columns,
)
from jaxrlhf.data.packing import length_buckets, pack_examples
from jaxrlhf.data.sources import BAD_ROW_FIELD, BAD_ROW_REASON, is_glob, load_sources
from jaxrlhf.data.templates import TEMPLATES

_VERSION = "jaxrlhf-data-2"  # 2: preference pairs cut to one shared prompt


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the data is and how to turn it into batches (see ``formats`` for formats and truncation).

    ``format``: None = detect from the columns. ``template``: chat template name / Jinja / ``.jinja`` path
    (None = the tokenizer's own). ``max_prompt_length``: prompts are cut (from the left) to this first.
    ``packing``: pack SFT examples into rows of ``max_length``, at most ``max_segments_per_row`` examples per
    row (the static bound the fused attention's packed layout is compiled for). ``bucket_lengths``: allowed
    padded lengths of prompt batches (default: powers of two up to the prompt limit). ``eval_split`` or
    ``eval_fraction`` make ``TokenizedDataset.eval``. ``streaming``: read lazily (no cache, no eval_fraction):
    for corpora larger than memory, e.g. shards named by a glob (``path: "refinedweb/*.parquet"``); each
    process reads its own subset of the files (see :class:`~jaxrlhf.data.Loader`). ``text_field``: the column
    of the ``text`` format (RefinedWeb's is ``content``).
    """

    path: str
    split: str = "train"
    format: str | None = None
    max_length: int = 512
    max_prompt_length: int | None = None
    truncation: str = "left"
    template: str | None = None
    packing: bool = False
    max_segments_per_row: int = 32
    batch_size: int = 8
    seed: int = 0
    shuffle: bool = True
    on_bad_row: str = "error"
    streaming: bool = False
    eval_split: str | None = None
    eval_fraction: float = 0.0
    bucket_lengths: tuple[int, ...] | None = None
    decoder_start_token_id: int | None = None
    num_proc: int | None = None
    cache_dir: str | None = None
    shuffle_buffer: int = 10_000
    text_field: str = "text"

    def __post_init__(self):
        if self.bucket_lengths is not None:  # YAML gives lists; keep the config hashable
            object.__setattr__(self, "bucket_lengths", tuple(int(b) for b in self.bucket_lengths))
        check_on_bad_row(self.on_bad_row)
        if self.truncation not in TRUNCATIONS:
            raise ValueError(f"truncation must be one of {TRUNCATIONS}, got {self.truncation!r}")
        if self.format is not None and self.format not in FORMATS:
            raise DataError(f"unknown format {self.format!r}; choose one of {FORMATS}", file=self.path)
        if self.max_prompt_length is not None and self.max_prompt_length >= self.max_length:
            raise ValueError("max_prompt_length must be smaller than max_length")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError("eval_fraction must be in [0, 1)")
        if self.max_segments_per_row < 1:
            raise ValueError(f"max_segments_per_row must be >= 1, got {self.max_segments_per_row}")


@dataclasses.dataclass
class TokenizedDataset:
    """Tokenized examples plus what the loader needs to batch them.

    ``data``: ``datasets.Dataset`` (or ``IterableDataset`` when streaming) with list columns per ``kind``
    (sft: input_ids, loss_mask [, segment_ids, positions when packed]; preference: chosen_/rejected_ ids and
    masks, margin; prompt: prompt_ids, index; seq2seq: input_ids, labels). ``raw``: the source rows (prompt
    kind: ``raw[index]`` gives the row, e.g. a reference answer for a reward function).
    """

    data: Any
    kind: str
    format: str
    pad_token_id: int
    max_length: int
    buckets: tuple[int, ...]
    decoder_start_token_id: int | None = None
    packed: bool = False
    max_segments: int | None = None  # packed, map-style: the most examples in one row (None: not known)
    skipped: int = 0
    raw: Any = None
    eval: TokenizedDataset | None = None

    def __len__(self) -> int:
        return len(self.data)


def _fingerprint(tokenizer, parts: list[Any]) -> str:
    files = []
    paths = [tokenizer.path]
    if os.path.isdir(tokenizer.path):
        paths = [os.path.join(tokenizer.path, name) for name in sorted(os.listdir(tokenizer.path))]
    for path in paths:
        if os.path.isfile(path):
            st = os.stat(path)
            files.append((os.path.basename(path), st.st_size, st.st_mtime_ns))
    sig = [
        tokenizer.path,
        files,
        tokenizer.vocab_size,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
        tokenizer.prefix_ids,
        tokenizer.suffix_ids,
        tokenizer.chat_template,
        _VERSION,
        parts,
    ]
    return hashlib.sha256(json.dumps(sig, default=str).encode()).hexdigest()[:32]


def _tokenize_source(name, ds, fmt, kind, tokenizer, opts, config, log, offset):
    columns = list(ds.column_names or [])
    if columns:
        need = required_columns(fmt, kind, columns, text_field=config.text_field)
        for col in need:
            if col not in columns:
                raise DataError(
                    f"column missing (columns: {columns}); format {fmt!r} needs {list(need)}",
                    file=name,
                    field=col,
                )
    skip = config.on_bad_row == "skip"
    out_cols = {
        "sft": ("input_ids", "loss_mask"),
        "preference": (
            "chosen_input_ids",
            "chosen_loss_mask",
            "rejected_input_ids",
            "rejected_loss_mask",
            "margin",
        ),
        "prompt": ("prompt_ids",),
        "seq2seq": ("input_ids", "labels"),
    }[kind]

    def fn(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out: dict[str, list] = {c: [] for c in (*out_cols, "index", "_error")}
        keys = list(batch)
        for j, row_index in enumerate(indices):
            row = {k: batch[k][j] for k in keys}
            try:
                if row.get(BAD_ROW_REASON):  # a line that sources.py could not read (skip mode only)
                    raise RowError(row[BAD_ROW_REASON], row.get(BAD_ROW_FIELD))
                example = process_row(row, fmt, kind, tokenizer, opts)
                error = ""
            except RowError as e:
                if config.streaming and not (skip or e.drop):  # lazy: the first bad row read stops it
                    raise DataError(e.reason, file=name, row=row_index, field=e.field) from None
                example = {c: (0.0 if c == "margin" else []) for c in out_cols}
                # the row's problem, read back after the map: skipped and counted, or (error mode) named;
                # not whether it is skipped (the cached map serves both on_bad_row modes)
                error = json.dumps([row_index, e.field, e.reason, bool(e.drop)])
                if config.streaming:
                    logger.warning(
                        "skipped bad row: %s, row %d, field %r: %s", name, row_index, e.field, e.reason
                    )
            for c in out_cols:
                out[c].append(example[c])
            out["index"].append(offset + row_index)
            out["_error"].append(error)
        return out

    kwargs: dict[str, Any] = dict(batched=True, with_indices=True, remove_columns=columns or None)
    if not config.streaming:
        kwargs.update(
            num_proc=config.num_proc,
            desc=f"tokenizing {os.path.basename(name)}",
            new_fingerprint=_fingerprint(tokenizer, [ds._fingerprint, fmt, kind, opts]),
        )
    mapped = ds.map(fn, **kwargs)
    if not config.streaming:
        _report_bad_rows(name, mapped["_error"], skip, log)
    return mapped.filter(lambda e: not e, input_columns="_error").remove_columns("_error")


def _report_bad_rows(name: str, marks: list[str], skip: bool, log: BadRowLog) -> None:
    """After the map: rows that may be dropped (``on_bad_row=skip``, or too long under ``truncation=drop``)
    are counted in ``log``; any other bad row raises one :class:`DataError` naming every such row (up to
    :data:`~jaxrlhf.data.errors.MAX_REPORTED`) with its 1-based line, and ``data.on_bad_row=skip``."""
    errors, total = [], 0
    for mark in marks:
        if not mark:
            continue
        row, field, reason, drop = json.loads(mark)
        if skip or drop:
            log.add(f"{name}, row {row}, field {field!r}: {reason}", reason.split(" (")[0])
            continue
        total += 1
        if len(errors) < MAX_REPORTED:
            errors.append(DataError(reason, file=name, row=row, field=field))
    if errors:
        raise bad_rows_error(errors, total)


def _pack(ds, max_length: int, tokenizer, config):
    def fn(batch):
        return pack_examples(batch["input_ids"], batch["loss_mask"], max_length, config.max_segments_per_row)

    # a streaming dataset may not know its columns after a map: name them (a packed batch has fewer rows)
    columns = list(ds.column_names or ("input_ids", "loss_mask"))
    kwargs: dict[str, Any] = dict(batched=True, batch_size=1000, remove_columns=columns)
    if not config.streaming:
        kwargs.update(
            new_fingerprint=_fingerprint(
                tokenizer, [ds._fingerprint, "pack", max_length, config.max_segments_per_row]
            ),
            num_proc=config.num_proc,
        )
    return ds.map(fn, **kwargs)


def build_dataset(config: DataConfig, tokenizer, kind: str, *, split: str | None = None) -> TokenizedDataset:
    """Load, check, tokenize (and pack) ``config.path`` for a stage of ``kind`` (sft, preference, prompt,
    seq2seq). Returns a :class:`TokenizedDataset` whose ``eval`` is set by ``eval_split`` / ``eval_fraction``.
    When ``config.template`` is set it becomes ``tokenizer.chat_template`` (so the stage checkpoint saves the
    template the model was trained with).
    """
    import datasets

    if kind not in KINDS:
        raise ValueError(f"unknown dataset kind {kind!r}; one of {KINDS}")
    if config.template is not None:
        from jaxrlhf.data.templates import resolve_template

        tokenizer.chat_template = resolve_template(config.template)
    split = split or config.split
    log = BadRowLog(f"{config.path}[{split}]")
    sources = load_sources(
        config.path,
        split,
        streaming=config.streaming,
        on_bad_row=config.on_bad_row,
        cache_dir=config.cache_dir,
    )
    fmt = config.format
    if fmt is None:
        first = sources[0][1]
        columns = list(first.column_names or next(iter(first), {}).keys())
        fmt = detect_format(columns, text_field=config.text_field)
        if fmt is None:
            raise DataError(
                f"cannot detect the format from columns {columns}; set format to one of {FORMATS} "
                "(and text_field, for plain text in a column other than 'text')",
                file=sources[0][0],
            )
    if fmt == "messages" and tokenizer.chat_template is None:
        raise DataError(
            f"chat data needs a chat template and the tokenizer {tokenizer.path} has none; "
            f"set template to one of {sorted(TEMPLATES)} (or a Jinja string)",
            file=config.path,
        )
    if fmt not in KIND_FORMATS[kind]:
        raise DataError(
            f"format {fmt!r} cannot feed a {kind!r} stage (accepted: {KIND_FORMATS[kind]})", file=config.path
        )
    opts = {
        "max_length": config.max_length,
        "max_prompt_length": config.max_prompt_length,
        "truncation": config.truncation,
        "text_field": config.text_field,
    }
    parts, raws, offset = [], [], 0
    for name, ds in sources:
        parts.append(_tokenize_source(name, ds, fmt, kind, tokenizer, opts, config, log, offset))
        raws.append(ds)
        if not config.streaming:
            offset += len(ds)
    log.report()
    data = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    raw = raws[0] if len(raws) == 1 else (None if config.streaming else datasets.concatenate_datasets(raws))
    packed = kind == "sft" and config.packing
    max_segments = None
    if packed:
        data = _pack(data.remove_columns("index"), config.max_length, tokenizer, config)
        if not config.streaming and len(data):
            max_segments = int(max(data["num_segments"]))
    if kind == "prompt":
        limit = config.max_prompt_length or config.max_length
        buckets = tuple(config.bucket_lengths or length_buckets(limit))
    elif kind == "seq2seq":
        buckets = (config.max_prompt_length or config.max_length, config.max_length)
    else:
        buckets = (config.max_length,)
    start = config.decoder_start_token_id
    if start is None and kind == "seq2seq":
        start = tokenizer.pad_token_id
    result = TokenizedDataset(
        data=data,
        kind=kind,
        format=fmt,
        pad_token_id=tokenizer.pad_token_id,
        max_length=config.max_length,
        buckets=buckets,
        decoder_start_token_id=start,
        packed=packed,
        max_segments=max_segments,
        skipped=log.count,
        raw=raw,
    )
    if split == config.split:
        if config.eval_split is not None:
            if os.path.isfile(config.path) or is_glob(config.path):
                raise DataError(
                    "a single file holds one split (and so do the files of a glob): use eval_fraction, or "
                    "a directory",
                    file=config.path,
                )
            result.eval = build_dataset(config, tokenizer, kind, split=config.eval_split)
        elif config.eval_fraction > 0:
            if config.streaming:
                raise ValueError("eval_fraction needs a map-style dataset; use eval_split with streaming")
            parts = data.train_test_split(test_size=config.eval_fraction, seed=config.seed, shuffle=True)
            result.data = parts["train"]
            result.eval = dataclasses.replace(result, data=parts["test"], eval=None)
    return result
