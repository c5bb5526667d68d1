"""Raw rows from local files and directories (json, jsonl, parquet, csv, arrow, ``save_to_disk`` folders)
or, when the user names one, a hub dataset id — all through ``datasets``.

Local files are loaded one by one so that an error can name the file and the row inside it. A directory
selects the files of a split by name (``train.jsonl``, ``train-00000.parquet``, ``train/part.csv``); when no
file names a split, every file belongs to ``train``. JSON, JSON-lines and CSV files are checked for invalid
UTF-8 first (``datasets`` would fail without saying where); under ``on_bad_row="skip"`` the bad lines of a
JSON-lines file are dropped (and counted) instead.
"""

from __future__ import annotations

import os
import tempfile

from jaxrlhf.data.errors import BadRowLog, DataError

_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
_SPLIT_NAMES = ("train", "validation", "valid", "val", "test", "eval", "dev")


def _builder(path: str) -> str | None:
    for ext, builder in _BUILDERS.items():
        if path.endswith(ext) or path.endswith(ext + ".gz"):
            return builder
    return None


def _split_of(rel_path: str) -> str | None:
    parts = rel_path.replace(os.sep, "/").lower().split("/")
    for part in reversed(parts):
        stem = part.split(".")[0]
        for name in _SPLIT_NAMES:
            if stem == name or stem.startswith(name + "-") or stem.startswith(name + "_"):
                return name
    return None


def local_files(path: str, split: str) -> list[str]:
    """The data files of ``split`` under a local file or directory (sorted)."""
    if os.path.isfile(path):
        if _builder(path) is None:
            raise DataError(f"unsupported file type; use one of {sorted(_BUILDERS)}", file=path)
        if split != "train" and _split_of(os.path.basename(path)) not in (split, None):
            raise DataError(
                f"file holds split {_split_of(os.path.basename(path))!r}, not {split!r}", file=path
            )
        return [path]
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


def _check_utf8(path: str, on_bad_row: str, work_dir: str, log: BadRowLog) -> str:
    """Return the path to load: ``path`` itself, or a copy without the undecodable lines (skip)."""
    if path.endswith(".gz") or _builder(path) not in ("json", "csv"):
        return path
    with open(path, "rb") as f:
        data = f.read()
    try:
        data.decode("utf-8")
        return path
    except UnicodeDecodeError:
        pass
    lines = data.split(b"\n")
    bad = []
    for i, line in enumerate(lines):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as e:
            bad.append((i, e.start))
    jsonl = path.endswith(".jsonl")
    first, col = bad[0]
    reason = f"invalid UTF-8 (byte {col} of line {first + 1})"
    if on_bad_row != "skip" or not jsonl:
        raise DataError(reason, file=path, row=first if jsonl else None)
    for i, c in bad:
        log.add(f"{path}, row {i}: invalid UTF-8 (byte {c})", "invalid UTF-8")
    bad_rows = {i for i, _ in bad}
    clean = os.path.join(work_dir, f"{len(os.listdir(work_dir))}_{os.path.basename(path)}")
    with open(clean, "wb") as f:
        f.write(b"\n".join(line for i, line in enumerate(lines) if i not in bad_rows))
    return clean


def load_sources(
    path: str,
    split: str = "train",
    *,
    streaming: bool = False,
    on_bad_row: str = "error",
    cache_dir: str | None = None,
    log: BadRowLog | None = None,
) -> list[tuple[str, object]]:
    """``[(name, datasets.Dataset | IterableDataset), ...]``: one per local file, or one for a hub id."""
    import datasets

    log = log or BadRowLog(path)
    if not os.path.exists(path):
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
    out = []
    work_dir = tempfile.mkdtemp(prefix="jaxrlhf_clean_", dir=cache_dir)
    for file in local_files(path, split):
        to_load = _check_utf8(file, on_bad_row, work_dir, log)
        try:
            ds = datasets.load_dataset(
                _builder(file), data_files=to_load, split="train", streaming=streaming, cache_dir=cache_dir
            )
        except Exception as e:
            raise DataError(f"cannot read the file ({type(e).__name__}: {e})", file=file) from e
        out.append((file, ds))
    return out
