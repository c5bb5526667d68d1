"""Errors of the data layer, and the bookkeeping of skipped rows.

Every problem with an input row is a :class:`DataError` that names the file, the row and the field, plus
where an editor finds it: the 1-based line of a JSON-lines / CSV file (blank lines and the CSV header
counted, as an editor counts them), or the 1-based row of a binary file::

    data/train.jsonl, row 50, field 'completion' (line 52 of the file): is empty. Fix the row, or set
    data.on_bad_row=skip to drop bad rows (they are counted and logged)

``DataError.row`` stays the 0-based index of the row among the file's rows (what ``datasets`` numbers).
Several bad rows of one file are reported together, up to :data:`MAX_REPORTED` of them, by
:func:`bad_rows_error` (a :class:`BadRowsError`). Under ``on_bad_row="skip"`` bad rows are dropped instead,
and :class:`BadRowLog` counts them and logs the reasons: skipping is never silent.
"""

from __future__ import annotations

import collections
import csv
import functools
import gzip
import io
import logging
import os

logger = logging.getLogger("jaxrlhf.data")

ON_BAD_ROW = ("error", "skip")
MAX_REPORTED = 20  # bad rows named in one error
SKIP_HINT = "Fix the row, or set data.on_bad_row=skip to drop bad rows (they are counted and logged)"


class DataError(ValueError):
    """A row (or a whole file) that the data layer cannot use.

    Attributes: ``file`` (path or hub id, or None), ``row`` (0-based row index, or None for a file-level
    problem), ``field`` (column name, or None), ``reason`` (what is wrong, without the location).
    """

    def __init__(
        self,
        reason: str,
        *,
        file: str | None = None,
        row: int | None = None,
        field: str | None = None,
        hint: bool | None = None,
    ):
        self.reason, self.file, self.row, self.field = reason, file, row, field
        self.hint = row is not None if hint is None else hint
        text = format_location(file, row, field) + reason
        if self.hint:
            text += ("" if text.endswith(".") else ".") + " " + SKIP_HINT
        super().__init__(text)

    def __reduce__(self):  # picklable (datasets.map may run in worker processes)
        return (_rebuild_error, (type(self), self.reason, self.file, self.row, self.field, self.hint))


def _rebuild_error(cls, reason, file, row, field, hint):
    return cls(reason, file=file, row=row, field=field, hint=hint)


class BadRowsError(DataError):
    """Several bad rows at once (see :func:`bad_rows_error`); ``errors`` holds each row's :class:`DataError`,
    ``total`` how many there were (more than ``len(errors)`` past :data:`MAX_REPORTED`)."""

    errors: list[DataError]
    total: int


def bad_rows_error(errors: list[DataError], total: int | None = None) -> DataError:
    """One error for the bad rows ``errors`` (a single one is returned as is): the first row's file, row and
    field as attributes, and every row (up to :data:`MAX_REPORTED`) named in the message."""
    total = len(errors) if total is None else total
    if total == 1 and len(errors) == 1:
        return errors[0]
    shown = errors[:MAX_REPORTED]
    lines = "\n".join(f"  {format_location(e.file, e.row, e.field)}{e.reason}" for e in shown)
    more = f"\n  ... and {total - len(shown)} more" if total > len(shown) else ""
    first = errors[0]
    files = {e.file for e in errors}
    # the message starts with the file when every row is of one file (each line names its own file anyway)
    err = BadRowsError(
        f"{total} bad rows:\n{lines}{more}\n{SKIP_HINT}",
        file=first.file if len(files) == 1 else None,
        row=None,
        field=None,
        hint=False,
    )
    err.file, err.row, err.field = first.file, first.row, first.field
    err.errors, err.total = list(errors), total
    return err


class TokenizerError(DataError):
    """A tokenizer directory or file that cannot be used (corrupt, truncated, or asking to run code)."""


class TemplateError(DataError):
    """A chat template that cannot produce a correct assistant-token mask for a conversation."""


def format_location(file: str | None, row: int | None, field: str | None) -> str:
    parts = []
    if file is not None:
        parts.append(str(file))
    if row is not None:
        parts.append(f"row {row}")
    if field is not None:
        parts.append(f"field {field!r}")
    where = ", ".join(parts)
    if row is not None and file is not None:
        where += f" ({position(str(file), row)})"
    return (where + ": ") if parts else ""


def position(file: str, row: int) -> str:
    """Where 0-based ``row`` of ``file`` is for a person: ``line N of the file`` (JSON lines, CSV) or
    ``row N counting from 1`` (other files, or a line that cannot be found)."""
    line = None
    if os.path.isfile(file):
        try:
            st = os.stat(file)
            line = _line_of(file, row, st.st_size, st.st_mtime_ns)
        except OSError:
            line = None
    return f"line {line} of the file" if line is not None else f"row {row + 1} counting from 1"


@functools.lru_cache(maxsize=64)
def _line_of(file: str, row: int, size: int, mtime: int) -> int | None:
    """1-based line where 0-based ``row`` starts: JSON lines count non-blank lines as rows, CSV counts
    records after the header (quoted fields may span lines). ``size`` / ``mtime`` key the cache."""
    del size, mtime
    if file.endswith((".jsonl", ".jsonl.gz", ".jsonl.zst")):
        r = -1
        with _open_lines(file) as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    r += 1
                    if r == row:
                        return i
        return None
    if file.endswith(".csv"):
        with open(file, newline="", encoding="utf-8", errors="replace") as f:
            reader = csv.reader(f)
            start = 1
            for r, _ in enumerate(reader, -1):  # the header is record -1
                if r == row:
                    return start
                start = reader.line_num + 1
        return None
    return None


def _open_lines(file: str):
    """A binary line iterator over ``file``, decompressing ``.gz`` / ``.zst`` (the latter via zstandard)."""
    if file.endswith(".gz"):
        return gzip.open(file, "rb")
    if file.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(file, "rb"), closefd=True))
    return open(file, "rb")


class BadRowLog:
    """Counts rows skipped under ``on_bad_row="skip"`` (by reason) and logs a summary with examples."""

    def __init__(self, source: str):
        self.source = source
        self.count = 0
        self.by_reason: collections.Counter[str] = collections.Counter()
        self.examples: list[str] = []

    def add(self, message: str, reason: str) -> None:
        self.count += 1
        self.by_reason[reason] += 1
        if len(self.examples) < 5:
            self.examples.append(message)

    def report(self) -> None:
        if self.count:
            logger.warning(
                "%s: skipped %d bad row(s) (on_bad_row=skip): %s; e.g. %s",
                self.source,
                self.count,
                dict(self.by_reason),
                " | ".join(self.examples),
            )


def check_on_bad_row(value: str) -> str:
    if value not in ON_BAD_ROW:
        raise ValueError(f"on_bad_row must be one of {ON_BAD_ROW}, got {value!r}")
    return value
