"""Local files of every supported type, directories with splits, save_to_disk folders, and the map cache."""

import json
import shutil

import datasets
import pytest

from jaxrlhf import data
from jaxrlhf.data import dataset as dataset_module

ROWS = [{"prompt": f"question {i}", "completion": f" answer {i} é"} for i in range(6)]


@pytest.fixture(scope="module")
def bpe(tok_dirs):
    return data.load_tokenizer(tok_dirs["bpe"])


def _build(path, tok, tmp_path, **kw):
    kw.setdefault("max_length", 32)
    cfg = data.DataConfig(path=str(path), cache_dir=str(tmp_path / "cache"), **kw)
    return data.build_dataset(cfg, tok, "sft")


def test_every_file_type_gives_the_same_examples(tmp_path, bpe):
    ref = _build(_write_jsonl(tmp_path / "ref.jsonl"), bpe, tmp_path)
    want = ref.data["input_ids"]
    ds = datasets.Dataset.from_list(ROWS)
    (tmp_path / "a.json").write_text(json.dumps(ROWS))
    ds.to_parquet(str(tmp_path / "b.parquet"))
    ds.to_csv(str(tmp_path / "c.csv"), index=False)
    ds.save_to_disk(str(tmp_path / "saved"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    shutil.copyfile(arrow, tmp_path / "d.arrow")
    for path in ("a.json", "b.parquet", "c.csv", "d.arrow", "saved"):
        got = _build(tmp_path / path, bpe, tmp_path)
        assert got.data["input_ids"] == want, path


def _write_jsonl(path, rows=ROWS):
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_directory_splits_and_errors(tmp_path, bpe):
    root = tmp_path / "corpus"
    (root / "train").mkdir(parents=True)
    _write_jsonl(root / "train" / "part-0.jsonl", ROWS[:3])
    _write_jsonl(root / "train" / "part-1.jsonl", ROWS[3:])
    _write_jsonl(root / "validation.jsonl", ROWS[:2])
    ds = _build(root, bpe, tmp_path, eval_split="validation")
    assert (len(ds), len(ds.eval)) == (6, 2)
    assert ds.data["index"] == list(range(6))  # rows of both files, in file order
    with pytest.raises(data.DataError, match="no files for split 'test'"):
        _build(root, bpe, tmp_path, split="test")
    with pytest.raises(data.DataError, match="no such file"):
        _build(tmp_path / "missing.jsonl", bpe, tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(data.DataError, match="unsupported file type"):
        _build(tmp_path / "notes.txt", bpe, tmp_path)


def test_errors_name_the_file_of_a_directory(tmp_path, bpe):
    root = tmp_path / "many"
    root.mkdir()
    _write_jsonl(root / "a.jsonl", ROWS)
    _write_jsonl(root / "b.jsonl", ROWS[:2] + [{"prompt": "p", "completion": ""}])
    with pytest.raises(data.DataError) as e:
        _build(root, bpe, tmp_path)
    assert (e.value.file, e.value.row, e.value.field) == (str(root / "b.jsonl"), 2, "completion")


def test_second_build_reads_the_cache(tmp_path, bpe, monkeypatch):
    path = _write_jsonl(tmp_path / "c.jsonl")
    first = _build(path, bpe, tmp_path)
    assert first.data.cache_files

    def fail(*args, **kwargs):
        raise AssertionError("tokenized again instead of reading the cache")

    monkeypatch.setattr(dataset_module, "process_row", fail)
    again = _build(path, bpe, tmp_path)
    assert again.data["input_ids"] == first.data["input_ids"]
    with pytest.raises(AssertionError, match="tokenized again"):  # other settings: a new fingerprint
        _build(path, bpe, tmp_path, max_length=31)
