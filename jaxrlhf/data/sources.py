"""Raw rows from local files, globs of files and directories (json, jsonl, parquet, csv, arrow; json /
jsonl / csv also ``.gz`` or ``.zst`` compressed; ``save_to_disk`` folders) or, when the user names one, a hub
dataset id — all through ``datasets``.

Local files are loaded one by one so that an error can name the file and the row inside it. A single file
is used whatever its name, and so is every file a glob matches (``corpus/shard-*.jsonl.zst``: the shards of
a pre-training corpus such as RedPajama, The Pile or Dolma; ``refinedweb/*.parquet``); a directory selects
the files of a split by name (``train.jsonl``, ``train-00000.parquet``, ``train/part.csv``); when no file
names a split, every file belongs to ``train``. Streaming reads keep one dataset (one shard) per file, so
that each process of a multi-host run reads its own files (see :mod:`jaxrlhf.data.loader`). ``.zst`` files
need the ``zstandard`` package.
When ``datasets`` cannot read a JSON-lines or CSV file (invalid UTF-8, invalid JSON, lone surrogates), the
file is scanned line by line to name every bad row (up to ``errors.MAX_REPORTED``, in one error); under
``on_bad_row="skip"`` the bad lines of a JSON-lines file are marked and then skipped (and counted) like any
bad row. Streaming reads check these files up front. A JSON-lines column holding values of several types
(strings in some rows, lists in others) is read by ``datasets`` as JSON, which turns a string that is JSON
text (``"4"``, ``"[5]"``) into a number or a list: such rows are bad rows too, named or skipped.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import tempfile

from jaxrlhf.data.errors import MAX_REPORTED, DataError, bad_rows_error

_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
BAD_ROW_REASON, BAD_ROW_FIELD = "__jaxrlhf_bad_row__", "__jaxrlhf_bad_field__"
_SPLIT_NAMES = ("train", "validation", "valid", "val", "test", "eval", "dev")
_COMPRESSED = (".gz", ".zst")  # of the text formats (datasets reads them through fsspec)


def _builder(path: str) -> str | None:
    for ext, builder in _BUILDERS.items():
        compressed = tuple(ext + c for c in _COMPRESSED) if builder in ("json", "csv") else ()
        if path.endswith((ext, *compressed)):
            return builder
    return None


def is_glob(path: str) -> bool:
    """Whether ``path`` is a glob pattern (``*``, ``?``, ``[...]``) rather than an existing path."""
    return glob.has_magic(path) and not os.path.exists(path)


def _glob_files(pattern: str) -> list[str]:
    files = sorted(f for f in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(f))
    if not files:
        raise DataError("no files match the glob", file=pattern)
    for f in files:
        if _builder(f) is None:
            raise DataError(
                f"the glob {pattern!r} matches a file of an unsupported type; use one of {sorted(_BUILDERS)}",
                file=f,
            )
    return files


def _split_of(rel_path: str) -> str | None:
    parts = rel_path.replace(os.sep, "/").lower().split("/")
    for part in reversed(parts):
        stem = part.split(".")[0]
        for name in _SPLIT_NAMES:
            if stem == name or stem.startswith(name + "-") or stem.startswith(name + "_"):
                return name
    return None


def local_files(path: str, split: str) -> list[str]:
    """The data files of ``split`` under a local file, glob or directory (sorted)."""
    if is_glob(path):
        return _glob_files(path)  # the files the user named are the split
    if os.path.isfile(path):
        if _builder(path) is None:
            raise DataError(f"unsupported file type; use one of {sorted(_BUILDERS)}", file=path)
        return [path]  # a single file is the one split it is named for
    files = []
    for root, _, names in os.walk(path):
        for name in names:
            full = os.path.join(root, name)
            if _builder(full) is not None and not name.startswith("."):
                files.append(full)
    files.sort()
    if not files:
        raise DataError(f"no data files ({', '.join(sorted(_BUILDERS))}) found", file=path)
    splits = {f: _split_of(os.path.relpath(f, path)) for f in files}
    if any(s is not None for s in splits.values()):
        chosen = [f for f in files if splits[f] == split]
    else:
        chosen = files if split == "train" else []
    if not chosen:
        found = sorted({s or "train" for s in splits.values()})
        raise DataError(f"no files for split {split!r} (splits found: {found})", file=path)
    return chosen


def _string_problem(value, field: str | None = None) -> tuple[str, str | None] | None:
    """(reason, field) for the first string in a JSON value that is not valid UTF-8 (lone surrogates)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            return f"invalid UTF-8 text ({e.reason})", field
    elif isinstance(value, dict):
        for k, v in value.items():
            found = _string_problem(v, field if field is not None else k)
            if found:
                return found
    elif isinstance(value, list):
        for v in value:
            found = _string_problem(v, field)
            if found:
                return found
    return None


def _kind(value) -> str | None:
    """The JSON type of a value as Arrow sees a column (ints and floats are one kind); None for null."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, dict):
        return "object"
    inner = next((_kind(v) for v in value if v is not None), None)
    return "list" if inner is None else f"list of {inner}"


def _type_problem(value, row: int, kinds: dict) -> tuple[str, str | None] | None:
    """A row that is not a JSON object, or a field whose type differs from the same field in an earlier row
    (one column holds one type), also inside objects and lists of objects (ShareGPT's
    ``conversations[].value``); ``kinds`` records ``path -> (kind, first row)``."""
    if not isinstance(value, dict):
        return f"expected a JSON object per line, got {type(value).__name__}", None
    for field, v in value.items():
        found = _kind_change(field, v, row, kinds)
        if found:
            return found, field
    return None


def _kind_change(path: str, value, row: int, kinds: dict) -> str | None:
    k = _kind(value)
    if k is None:
        return None
    seen = kinds.setdefault(path, (k, row))
    if seen[0] != k and not (k.startswith("list") and seen[0] == "list" or seen[0].startswith(k)):
        where = "" if "." not in path and "[" not in path else f"{path} "
        return f"{where}holds a {k} here but a {seen[0]} in row {seen[1]} (a column holds one type)"
    items = value.items() if isinstance(value, dict) else ()
    if isinstance(value, list):
        items = [(f"[].{key}", v) for x in value if isinstance(x, dict) for key, v in x.items()]
    for key, v in items:
        found = _kind_change(f"{path}.{key}" if isinstance(value, dict) else path + key, v, row, kinds)
        if found:
            return found
    return None


def _scan_lines(path: str) -> tuple[list[bytes], list[tuple[int, str, str | None]]]:
    """Lines of a JSON-lines / CSV file and its bad rows ``(row, reason, field)`` (rows = non-blank lines)."""
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    bad, row, kinds = [], 0, {}
    jsonl = path.endswith(".jsonl")
    for i, line in enumerate(lines):
        if jsonl and not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:  # JSON lines: the error's location names the line
            where = f"byte {e.start}" if jsonl else f"byte {e.start} of line {i + 1}"
            bad.append((row if jsonl else i, f"invalid UTF-8 ({where})", None))
        else:
            if jsonl:
                try:
                    value = json.loads(text)
                    found = _string_problem(value) or _type_problem(value, row, kinds)
                except json.JSONDecodeError as e:
                    found = (f"invalid JSON ({e.msg} at column {e.colno})", None)
                if found:
                    bad.append((row, *found))
        row += 1
    return lines, bad


def _first_line_not_object(path: str) -> bool:
    """Whether the first non-blank line of a JSON-lines file is something other than an object; such files
    are scanned by :func:`_scan_lines` instead of handed to ``datasets`` (pyarrow 26 segfaults on a file that
    starts with a ``null`` line)."""
    if not path.endswith(".jsonl"):
        return False
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                return not line.lstrip().startswith(b"{")
    return False


def _json_columns(datasets, ds) -> list[str]:
    """Columns that ``datasets`` read as ``Json`` (values of several types in one column)."""
    json_type = getattr(datasets, "Json", None)
    return [k for k, f in (ds.features or {}).items() if json_type is not None and isinstance(f, json_type)]


def _scan_json_strings(path: str, columns: list[str]) -> tuple[list[bytes], list[tuple[int, str, str]]]:
    """Rows of a JSON-lines file whose string in one of ``columns`` (``Json`` columns) is itself valid JSON:
    ``datasets`` stores such a string unquoted and decodes it (``"4"`` -> ``4``, ``"[5]"`` -> ``[5]``)."""
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    bad, row = [], 0
    for line in lines:
        if not line.strip():
            continue
        value = json.loads(line)
        for col in columns:
            text = value.get(col) if isinstance(value, dict) else None
            try:
                decoded = json.loads(text) if isinstance(text, str) else None
            except ValueError:
                continue
            if isinstance(text, str):
                bad.append((row, (
                    f"the string {text[:40]!r} reads as JSON (a {type(decoded).__name__}) in a column that "
                    "holds other types too, where datasets would decode it; make the column hold one type"
                ), col))  # fmt: skip
                break
        row += 1
    return lines, bad


def _load_file(datasets, file: str, streaming: bool, cache_dir, on_bad_row: str):
    if file.endswith(".zst") and importlib.util.find_spec("zstandard") is None:
        raise DataError(
            "reading zstandard-compressed (.zst) files needs the zstandard package: pip install zstandard",
            file=file,
        )
    compressed = file.endswith(_COMPRESSED)

    def load(path):
        return datasets.load_dataset(
            _builder(file), data_files=path, split="train", streaming=streaming, cache_dir=cache_dir
        )

    scanned = None
    try:
        if _first_line_not_object(file):
            raise DataError("the first row is not a JSON object", file=file)
        ds = load(file)
        if not streaming:
            mixed = _json_columns(datasets, ds) if file.endswith(".jsonl") else []
            scanned = _scan_json_strings(file, mixed) if mixed else None
            if scanned is None or not scanned[1]:
                return ds
    except Exception as e:
        error = e
    else:  # streaming reads lazily: check text files up front
        if scanned is None and (
            _builder(file) not in ("json", "csv") or compressed or not _scan_lines(file)[1]
        ):
            return ds
        error = None
    if _builder(file) not in ("json", "csv") or compressed:
        raise DataError(f"cannot read the file ({type(error).__name__}: {error})", file=file) from error
    lines, bad = scanned or _scan_lines(file)
    if not bad:
        raise DataError(f"cannot read the file ({type(error).__name__}: {error})", file=file) from error
    row, reason, field = bad[0]
    jsonl = file.endswith(".jsonl")
    if not jsonl:
        raise DataError(reason, file=file, field=field)
    errors = [DataError(r, file=file, row=i, field=f) for i, r, f in bad[:MAX_REPORTED]]
    if on_bad_row != "skip":  # every unreadable line at once (up to MAX_REPORTED)
        raise bad_rows_error(errors, len(bad))
    if len(bad) == sum(1 for line in lines if line.strip()):
        first = bad_rows_error(errors, len(bad))
        raise DataError(f"no readable row, nothing to skip to: {first}", file=file, hint=False)
    # a copy with each bad line replaced by a marker row, so row numbers stay those of the file and the
    # tokenizing step skips (and counts) the marked rows like any other bad row
    bad_rows, kept, r = {b[0]: b[1:] for b in bad}, [], 0
    for line in lines:
        if line.strip():
            if r in bad_rows:
                reason, field = bad_rows[r]
                line = json.dumps({BAD_ROW_REASON: reason, BAD_ROW_FIELD: field}).encode()
            kept.append(line)
            r += 1
    if cache_dir is not None:
        os.makedirs(cache_dir, exist_ok=True)
    clean = os.path.join(tempfile.mkdtemp(prefix="jaxrlhf_clean_", dir=cache_dir), os.path.basename(file))
    with open(clean, "wb") as f:
        f.write(b"\n".join(kept))
    return load(clean)


def load_sources(
    path: str,
    split: str = "train",
    *,
    streaming: bool = False,
    on_bad_row: str = "error",
    cache_dir: str | None = None,
) -> list[tuple[str, object]]:
    """``[(name, datasets.Dataset | IterableDataset), ...]``: one per local file, or one for a hub id."""
    import datasets

    if not os.path.exists(path) and not is_glob(path):
        if path.startswith((".", "/", "~")) or _builder(path) is not None:
            raise DataError("no such file or directory", file=path)
        # a hub id, only when the user names one
        return [
            (
                f"{path}[{split}]",
                datasets.load_dataset(path, split=split, streaming=streaming, cache_dir=cache_dir),
            )
        ]
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "dataset_info.json")):
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"no split {split!r} (splits: {list(ds)})", file=path)
            ds = ds[split]
        return [(path, ds.to_iterable_dataset() if streaming else ds)]
    return [
        (file, _load_file(datasets, file, streaming, cache_dir, on_bad_row))
        for file in local_files(path, split)
    ]
