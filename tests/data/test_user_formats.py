"""Data users bring: alpaca rows, FastChat / ShareGPT conversations, and streamed plain-text corpora
(RefinedWeb / RedPajama / Dolma layouts: parquet or JSON-lines shards, gzip or zstandard, a glob of files)
split over processes, end to end through the loader; bad rows named by file, 1-based line and field."""

import gzip
import importlib.util
import json

import numpy as np
import pytest

from jaxrlhf import data

ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)  # alpaca-lora's templates/alpaca.json, written out here to check the library's copy
ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
    "### Input:\n{input}\n\n### Response:\n"
)
ALPACA_ROWS = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "2 plus 3 is 5."},
    {"instruction": "Say hello.", "input": "", "output": "Hello world!"},
    {"instruction": "Name a colour.", "input": None, "output": "Blue."},
]


@pytest.fixture(scope="module")
def plain(tok_dirs):
    return data.load_tokenizer(tok_dirs["bpe"])  # no chat template


@pytest.fixture(scope="module")
def chat(tok_dirs):
    return data.load_tokenizer(tok_dirs["bpe"], chat_template="chatml")


def write_jsonl(path, rows, blank_after: int | None = None):
    lines = [json.dumps(r) for r in rows]
    if blank_after is not None:  # a blank line: 1-based lines differ from rows + 1 after it
        lines.insert(blank_after + 1, "")
    text = "\n".join(lines) + "\n"
    if str(path).endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return str(path)


def build(tmp_path, rows, tok, kind, name="d.jsonl", **kw):
    kw.setdefault("max_length", 256)
    path = write_jsonl(tmp_path / name, rows)
    return data.build_dataset(data.DataConfig(path=path, cache_dir=str(tmp_path / "cache"), **kw), tok, kind)


def one_batch(ds, n):
    return next(data.Loader(ds, n, shuffle=False, process_index=0, process_count=1))


def masked(tok, ids, mask):
    return tok.decode([int(i) for i, m in zip(ids, mask, strict=True) if m])


def test_detect_format_of_user_layouts():
    assert data.detect_format(["instruction", "input", "output"]) == "alpaca"
    assert data.detect_format(["instruction", "output"]) == "alpaca"
    assert data.detect_format(["id", "conversations"]) == "messages"
    assert data.detect_format(["content", "url", "timestamp"], text_field="content") == "text"  # RefinedWeb
    assert data.detect_format(["content", "url"]) is None
    assert data.detect_format(["text", "meta"]) == "text"  # RedPajama / The Pile / Dolma


def test_alpaca_without_a_chat_template_is_alpaca_lora_text(tmp_path, plain):
    batch = one_batch(build(tmp_path, ALPACA_ROWS, plain, "sft"), 3)
    prompts = [
        ALPACA_INPUT.format(instruction="Add the numbers.", input="2 and 3"),
        ALPACA_NO_INPUT.format(instruction="Say hello."),
        ALPACA_NO_INPUT.format(instruction="Name a colour."),
    ]
    for b, (prompt, row) in enumerate(zip(prompts, ALPACA_ROWS, strict=True)):
        p, c = [*plain.prefix_ids, *plain.encode(prompt)], plain.encode(row["output"]) + [plain.eos_token_id]
        n = len(p) + len(c)
        assert batch["input_ids"][b, :n].tolist() == p + c
        assert batch["loss_mask"][b].tolist() == [0] * len(p) + [1] * len(c) + [0] * (256 - n)
        assert masked(plain, batch["input_ids"][b], batch["loss_mask"][b]) == row["output"] + plain.eos_token


def test_alpaca_with_a_chat_template_is_one_user_turn(tmp_path, chat):
    batch = one_batch(build(tmp_path, ALPACA_ROWS, chat, "sft"), 3)
    users = ["Add the numbers.\n\n2 and 3", "Say hello.", "Name a colour."]
    for b, (user, row) in enumerate(zip(users, ALPACA_ROWS, strict=True)):
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]
        ids, mask = data.tokenize_chat(chat, msgs)
        assert batch["input_ids"][b, : len(ids)].tolist() == ids
        assert (
            batch["loss_mask"][b, : len(ids)].tolist() == mask
            and batch["loss_mask"][b, len(ids) :].sum() == 0
        )
        assert masked(chat, batch["input_ids"][b], batch["loss_mask"][b]) == row["output"] + "<|im_end|>"


def test_sharegpt_conversations_through_the_loader(tmp_path, chat):
    conv = [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "hi"},
        {"from": "gpt", "value": "hello"},
        {"from": "human", "value": "2+2?"},
        {"from": "gpt", "value": "4"},
    ]
    batch = one_batch(build(tmp_path, [{"id": "a", "conversations": conv}] * 2, chat, "sft"), 2)
    roles = {"system": "system", "human": "user", "gpt": "assistant"}
    msgs = [{"role": roles[m["from"]], "content": m["value"]} for m in conv]
    ids, mask = data.tokenize_chat(chat, msgs)
    assert (
        batch["input_ids"][0, : len(ids)].tolist() == ids
        and batch["loss_mask"][0, : len(ids)].tolist() == mask
    )
    assert masked(chat, ids, mask) == "hello<|im_end|>4<|im_end|>"  # both assistant turns, nothing else


def test_conversational_prompt_completion_is_tokenized_as_a_preference_response(tmp_path, chat):
    """TRL's conversational prompt / completion rows (what ``jaxrlhf generate --output`` writes for chat
    prompts): the tokens a preference row's response gets, loss on the final assistant turn only."""
    prompt = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
              {"role": "user", "content": "2+2?"}]  # fmt: skip
    pref = build(
        tmp_path, [{"prompt": prompt, "chosen": "4", "rejected": "5"}], chat, "preference", name="p.jsonl"
    )
    completions = ("4", [{"role": "assistant", "content": "4"}])  # a string, or the assistant message
    for i, completion in enumerate(completions):  # one file each: a column holds one type
        ds = build(tmp_path, [{"prompt": prompt, "completion": completion}], chat, "sft", name=f"c{i}.jsonl")
        assert ds.data[0]["input_ids"] == pref.data[0]["chosen_input_ids"]
        assert ds.data[0]["loss_mask"] == pref.data[0]["chosen_loss_mask"]
    assert masked(chat, ds.data[0]["input_ids"], ds.data[0]["loss_mask"]) == "4<|im_end|>"


def test_a_column_of_mixed_types_is_named_not_json_decoded(tmp_path, chat):
    """datasets reads a column holding strings and lists as JSON and decodes the strings that are JSON text
    ("4" -> 4, "[5]" -> [5]): such rows are named (or skipped), the others read as written."""
    prompt = [{"role": "user", "content": "2+2?"}]
    rows = [{"prompt": prompt, "completion": "4"}, {"prompt": prompt, "completion": "[5]"},
            {"prompt": prompt, "completion": [{"role": "assistant", "content": "4"}]}]  # fmt: skip
    rows.insert(1, {"prompt": prompt, "completion": "four"})  # a string that is not JSON reads back fine
    with pytest.raises(data.DataError, match=r"the string '\[5\]' reads as JSON \(a list\)") as e:
        build(tmp_path, rows, chat, "sft")
    assert (e.value.row, e.value.field) == (0, "completion") and "'4' reads as JSON (a int)" in str(e.value)
    assert "row 2, field 'completion' (line 3 of the file): the string '[5]'" in str(e.value)
    ds = build(tmp_path, rows, chat, "sft", on_bad_row="skip")
    assert len(ds) == 2 and ds.skipped == 2
    assert [masked(chat, e["input_ids"], e["loss_mask"]) for e in ds.data] == [
        "four<|im_end|>",
        "4<|im_end|>",
    ]


def test_alpaca_and_sharegpt_rows_as_rl_prompts(tmp_path, plain, chat):
    from jaxrlhf.rl import prompts as prompts_lib

    rows = [{"instruction": "Add the numbers.", "input": "2 and 3"}, {"instruction": "Say hello."}]
    ds = build(tmp_path, rows, plain, "prompt", name="p.jsonl")  # no output column: prompts only
    assert ds.format == "alpaca"
    want = [ALPACA_INPUT.format(instruction="Add the numbers.", input="2 and 3"), ALPACA_NO_INPUT.format(
        instruction="Say hello.")]  # fmt: skip
    assert [ds.data[i]["prompt_ids"] for i in range(2)] == [
        [*plain.prefix_ids, *plain.encode(w)] for w in want
    ]
    loader = prompts_lib.PromptLoader(ds, 2, shuffle=False, process_index=0, process_count=1)
    batch = next(loader)
    assert sorted(batch.prompts) == ["Add the numbers.\n\n2 and 3", "Say hello."]  # what reward functions see
    ds = build(tmp_path, ALPACA_ROWS[:1], chat, "prompt", name="c.jsonl")
    user = [{"role": "user", "content": "Add the numbers.\n\n2 and 3"}]
    assert ds.data[0]["prompt_ids"] == data.tokenize_chat_prompt(chat, user)
    conv = [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "hi"},
        {"from": "gpt", "value": "x"},
    ]
    ds = build(tmp_path, [{"conversations": conv}], chat, "prompt", name="s.jsonl")
    want_ids = data.tokenize_chat_prompt(
        chat, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    )
    assert ds.data[0]["prompt_ids"] == want_ids  # the final gpt turn is what the policy will generate


# ----------------------------------------------------------------------------------------------- bad rows
GOOD_ALPACA = {"instruction": "a", "input": "", "output": "b"}
GOOD_SHARE = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
BAD_ROWS = [
    # (good row, bad row, field, message, tokenizer, file name)
    (GOOD_ALPACA, {"instruction": "a", "input": ""}, "output", "missing value", "plain", "a.jsonl"),
    (GOOD_ALPACA, {"instruction": "a", "input": "", "output": ""}, "output", "is empty", "chat", "a.jsonl"),
    (GOOD_ALPACA, {"instruction": "", "input": "x", "output": "b"}, "instruction", "is empty", "plain",
     "a.jsonl"),
    (GOOD_ALPACA, {"instruction": 2, "output": "b"}, "instruction", "holds a number here but a string",
     "plain", "a.jsonl"),
    (GOOD_SHARE, {"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "yo"}]},
     "conversations", "message 1 has unknown role 'bot' in 'from'", "chat", "s.jsonl"),
    (GOOD_SHARE, {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": 3}]},
     "conversations", r"conversations\[\].value holds a number here but a string in row 0", "chat",
     "s.jsonl"),
    ({"text": "fine"}, {"text": None, "meta": {}}, "text", "missing value", "plain", "t.jsonl.gz"),
]  # fmt: skip


@pytest.mark.parametrize("good,bad,field,message,tok_name,name", BAD_ROWS)
def test_bad_rows_name_file_line_and_field(tmp_path, plain, chat, good, bad, field, message, tok_name, name):
    tok = {"plain": plain, "chat": chat}[tok_name]
    rows = [good, good, bad, good]  # row 2, on line 4 of the file (a blank line after row 0)
    path = write_jsonl(tmp_path / name, rows, blank_after=0)
    cfg = data.DataConfig(path=path, max_length=64, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(data.DataError, match=message) as e:
        data.build_dataset(cfg, tok, "sft")
    assert (e.value.file, e.value.row, e.value.field) == (path, 2, field)
    assert f"{path}, row 2, field {field!r} (line 4 of the file)" in str(e.value)
    skip = data.DataConfig(path=path, max_length=64, on_bad_row="skip", cache_dir=str(tmp_path / "cache2"))
    skipped = data.build_dataset(skip, tok, "sft")
    assert len(skipped) == 3 and skipped.skipped == 1


# ------------------------------------------------------------------------------------- streamed corpora
def _docs(shard: int, n: int) -> list[str]:
    return [f"shard {shard} document {i} says hello" for i in range(n)]


def _write_parquet(path, column: str, texts: list[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({column: texts, "url": [f"http://x/{t}" for t in texts]}), path, row_group_size=2)


def _texts(tok, batch) -> list[str]:
    """The documents of a batch: each segment without its BOS / EOS."""
    out = []
    for ids, seg in zip(batch["input_ids"], batch["segment_ids"], strict=True):
        for s in range(1, int(seg.max()) + 1):
            out.append(tok.decode([int(i) for i in ids[seg == s]], skip_special_tokens=True))
    return out


def _read_all(ds, tok, rank: int, world: int, batch_size: int) -> list[str]:
    loader = data.Loader(ds, batch_size, seed=5, process_index=rank, process_count=world, num_epochs=1)
    return [t for batch in loader for t in _texts(tok, batch)]


def test_refinedweb_parquet_shards_split_over_two_processes(tmp_path, plain):
    """4 parquet shards (RefinedWeb layout: a ``content`` column) named by a glob, streamed: process 0 and
    process 1 of 2 each read two whole shards; together they read every document once."""
    (tmp_path / "rw").mkdir()
    for s in range(4):
        _write_parquet(tmp_path / "rw" / f"train-{s:05d}-of-00004.parquet", "content", _docs(s, 6))
    cfg = data.DataConfig(
        path=str(tmp_path / "rw" / "train-*.parquet"), streaming=True, text_field="content", max_length=32
    )
    ds = data.build_dataset(cfg, plain, "sft")
    assert ds.format == "text"
    seen = [_read_all(ds, plain, rank, 2, 4) for rank in (0, 1)]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(d for s in range(4) for d in _docs(s, 6))
    shards = [{int(t.split()[1]) for t in texts} for texts in seen]
    assert [len(s) for s in shards] == [2, 2] and shards[0] | shards[1] == {0, 1, 2, 3}  # whole files each
    # one example's tokens and loss mask: [BOS] text EOS, every token after the first a target
    first = next(data.Loader(ds, 1, shuffle=False, process_index=0, process_count=1))
    n = int(first["attention_mask"].sum())
    want = [*plain.prefix_ids, *plain.encode(_docs(0, 1)[0]), plain.eos_token_id]
    assert first["input_ids"][0, :n].tolist() == want and first["loss_mask"][0, :n].tolist() == [0] + [1] * (
        n - 1
    )


def test_gzip_jsonl_shards_packed_and_split(tmp_path, plain):
    """RedPajama / Dolma layout (``text`` in JSON lines, gzip) packed while streaming: every packed row
    decodes to whole documents, the loss mask restarts in every segment, the two processes read disjoint
    documents that together are the corpus."""
    for s in range(2):
        write_jsonl(tmp_path / f"shard_{s}.jsonl.gz", [{"text": t, "meta": {"s": s}} for t in _docs(s, 7)])
    cfg = data.DataConfig(
        path=str(tmp_path / "shard_*.jsonl.gz"), streaming=True, packing=True, max_length=64
    )
    ds = data.build_dataset(cfg, plain, "sft")
    batch = next(data.Loader(ds, 1, shuffle=False, process_index=0, process_count=1))
    assert batch["segment_ids"].max() >= 2  # several documents in one row
    for s in range(1, int(batch["segment_ids"].max()) + 1):
        seg = batch["segment_ids"][0] == s
        assert batch["loss_mask"][0][seg].tolist() == [0] + [1] * (int(seg.sum()) - 1)
        assert batch["positions"][0][seg].tolist() == list(range(int(seg.sum())))
    seen = [_read_all(ds, plain, rank, 2, 2) for rank in (0, 1)]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(_docs(0, 7) + _docs(1, 7))


def test_zstandard_shards_or_what_to_install(tmp_path, plain):
    rows = [{"text": t} for t in _docs(0, 3)]
    path = tmp_path / "c.jsonl.zst"
    cfg = data.DataConfig(path=str(path), streaming=True, max_length=32)
    if importlib.util.find_spec("zstandard") is None:
        path.write_bytes(b"\x28\xb5\x2f\xfd")  # the zstd magic number; never read
        with pytest.raises(data.DataError, match="needs the zstandard package: pip install zstandard") as e:
            data.build_dataset(cfg, plain, "sft")
        assert e.value.file == str(path)
        return
    import zstandard

    def write(lines):
        path.write_bytes(zstandard.ZstdCompressor().compress(("\n".join(lines) + "\n").encode()))

    write([json.dumps(r) for r in rows])
    examples = list(data.build_dataset(cfg, plain, "sft").data)
    assert [plain.decode(e["input_ids"], skip_special_tokens=True) for e in examples] == _docs(0, 3)
    write([json.dumps(r) for r in rows] + [json.dumps({"text": 7})])
    with pytest.raises(
        data.DataError, match=r"row 3, field 'text' \(line 4 of the file\): expected a string"
    ):
        list(data.build_dataset(cfg, plain, "sft").data)


def test_glob_errors(tmp_path, plain):
    with pytest.raises(data.DataError, match="no files match the glob"):
        data.build_dataset(data.DataConfig(path=str(tmp_path / "none-*.jsonl")), plain, "sft")
    write_jsonl(tmp_path / "a-0.jsonl", [{"text": "x"}])
    (tmp_path / "a-1.txt").write_text("x")
    with pytest.raises(data.DataError, match="unsupported type") as e:
        data.build_dataset(data.DataConfig(path=str(tmp_path / "a-*")), plain, "sft")
    assert e.value.file == str(tmp_path / "a-1.txt")
    cfg = data.DataConfig(path=str(tmp_path / "a-*.jsonl"), eval_split="validation")
    with pytest.raises(data.DataError, match="the files of a glob"):
        data.build_dataset(cfg, plain, "sft")
    ds = data.build_dataset(data.DataConfig(path=str(tmp_path / "a-*.jsonl"), cache_dir=str(tmp_path / "c")),
                            plain, "sft")  # fmt: skip
    assert len(ds) == 1 and np.asarray(ds.data[0]["loss_mask"]).sum() == len(ds.data[0]["input_ids"]) - 1
