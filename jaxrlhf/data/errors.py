"""Errors of the data layer, and the bookkeeping of skipped rows.

Every problem with an input row is a :class:`DataError` that names the file, the row (0-based, as stored
in the file; a JSON-lines row is its line number minus one) and the field. Under ``on_bad_row="skip"``
the row is dropped instead, and :class:`BadRowLog` counts it and logs the reasons: skipping is never silent.
"""

from __future__ import annotations

import collections
import logging

logger = logging.getLogger("jaxrlhf.data")

ON_BAD_ROW = ("error", "skip")


class DataError(ValueError):
    """A row (or a whole file) that the data layer cannot use.

    Attributes: ``file`` (path or hub id, or None), ``row`` (0-based row index, or None for a file-level
    problem), ``field`` (column name, or None), ``reason`` (what is wrong, without the location).
    """

    def __init__(
        self, reason: str, *, file: str | None = None, row: int | None = None, field: str | None = None
    ):
        self.reason, self.file, self.row, self.field = reason, file, row, field
        super().__init__(format_location(file, row, field) + reason)

    def __reduce__(self):  # picklable (datasets.map may run in worker processes)
        return (_rebuild_error, (self.reason, self.file, self.row, self.field))


def _rebuild_error(reason, file, row, field):
    return DataError(reason, file=file, row=row, field=field)


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
    return (", ".join(parts) + ": ") if parts else ""


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
