"""Formats -> tokenized examples, truncation, and bad input that is named (file, row, field) or skipped."""

import json
import logging

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings

from jaxrlhf import data


@pytest.fixture(scope="module")
def bpe(tok_dirs):
    return data.load_tokenizer(tok_dirs["bpe"], chat_template="chatml")


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def build(tmp_path, rows, tok, kind, name="d.jsonl", **kw):
    kw.setdefault("max_length", 64)
    path = write_jsonl(tmp_path / name, rows)
    cfg = data.DataConfig(path=path, cache_dir=str(tmp_path / "cache"), **kw)
    return data.build_dataset(cfg, tok, kind)


def masked_text(tok, ids, mask):
    return tok.decode([i for i, m in zip(ids, mask, strict=True) if m])


def test_detect_format():
    assert data.detect_format(["text"]) == "text"
    assert data.detect_format(["prompt", "completion"]) == "prompt_completion"
    assert data.detect_format(["messages", "id"]) == "messages"
    assert data.detect_format(["conversations"]) == "messages"
    assert data.detect_format(["prompt", "chosen", "rejected"]) == "preference"
    assert data.detect_format(["chosen", "rejected", "margin"]) == "preference"
    assert data.detect_format(["prompt", "answer"]) == "prompt"
    assert data.detect_format(["inputs", "targets"]) == "seq2seq"
    assert data.detect_format(["question"]) is None


def test_text_and_prompt_completion(tmp_path, bpe):
    ds = build(tmp_path, [{"text": "The quick brown fox."}], bpe, "sft", name="t.jsonl")
    ex = ds.data[0]
    assert ex["input_ids"] == [*bpe.prefix_ids, *bpe.encode("The quick brown fox."), bpe.eos_token_id]
    assert ex["loss_mask"] == [0] + [1] * (len(ex["input_ids"]) - 1)
    ds = build(tmp_path, [{"prompt": "What is 2+2?", "completion": " four"}], bpe, "sft")
    ex = ds.data[0]
    assert ex["input_ids"] == [
        *bpe.prefix_ids,
        *bpe.encode("What is 2+2?"),
        *bpe.encode(" four"),
        bpe.eos_token_id,
    ]
    assert masked_text(bpe, ex["input_ids"], ex["loss_mask"]) == " four" + bpe.eos_token


def test_messages_and_sharegpt(tmp_path, bpe):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello 🙂"}]
    ds = build(tmp_path, [{"messages": msgs}], bpe, "sft")
    ids, mask = data.tokenize_chat(bpe, msgs)
    assert ds.data[0]["input_ids"] == ids and ds.data[0]["loss_mask"] == mask
    share = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello 🙂"}]
    ds = build(tmp_path, [{"conversations": share}], bpe, "sft", name="s.jsonl")
    assert ds.data[0]["input_ids"] == ids and ds.data[0]["loss_mask"] == mask


def test_preference_strings_and_messages(tmp_path, bpe):
    rows = [{"prompt": "Q?", "chosen": " good", "rejected": " bad answer", "margin": 1.5}]
    ex = build(tmp_path, rows, bpe, "preference").data[0]
    assert masked_text(bpe, ex["chosen_input_ids"], ex["chosen_loss_mask"]) == " good" + bpe.eos_token
    assert (
        masked_text(bpe, ex["rejected_input_ids"], ex["rejected_loss_mask"]) == " bad answer" + bpe.eos_token
    )
    assert ex["margin"] == 1.5
    prompt = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ]
    rows = [{"prompt": prompt, "chosen": [{"role": "assistant", "content": "yes"}], "rejected": "no"}]
    ex = build(tmp_path, rows, bpe, "preference", name="m.jsonl").data[0]
    # only the final answer is scored, not the earlier assistant turn of the prompt
    assert masked_text(bpe, ex["chosen_input_ids"], ex["chosen_loss_mask"]) == "yes<|im_end|>"
    assert masked_text(bpe, ex["rejected_input_ids"], ex["rejected_loss_mask"]) == "no<|im_end|>"
    assert ex["margin"] == 0.0


HH = "\n\nHuman: What is two plus two?\n\nAssistant:"
USER, ASSISTANT = "user", "assistant"


def _msg(role, content):
    return {"role": role, "content": content}


def test_preference_implicit_prompts_match_explicit_ones(tmp_path, bpe):
    """HH-RLHF texts and conversations that carry their own prompt tokenize exactly like the explicit rows."""
    multi = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: what is two plus two?\n\nAssistant:"
    implicit = [
        {"chosen": HH + " The answer is four.", "rejected": HH + " The answer is five."},
        {"chosen": multi + " four", "rejected": multi + " 5"},
    ]
    explicit = [
        {"prompt": HH, "chosen": " The answer is four.", "rejected": " The answer is five."},
        {"prompt": multi, "chosen": " four", "rejected": " 5"},
    ]
    got = build(tmp_path, implicit, bpe, "preference", name="hh.jsonl").data
    want = build(tmp_path, explicit, bpe, "preference", name="explicit.jsonl").data
    for i in range(2):
        assert got[i] == want[i]
    # the prompt ends at the last "Assistant:" even though both answers start with "The answer is"
    ex = got[0]
    assert (
        masked_text(bpe, ex["chosen_input_ids"], ex["chosen_loss_mask"])
        == " The answer is four." + bpe.eos_token
    )
    prompts = build(tmp_path, implicit, bpe, "prompt", name="hh_prompts.jsonl").data
    assert prompts[1]["prompt_ids"] == [*bpe.prefix_ids, *bpe.encode(multi)]

    shared = [_msg(USER, "a"), _msg(ASSISTANT, "b"), _msg(USER, "c")]
    yes, no = [_msg(ASSISTANT, "yes")], [_msg(ASSISTANT, "no")]
    ultrafeedback = {"prompt": "c", "chosen": shared + yes, "rejected": shared + no}
    conversations = {"chosen": shared + yes, "rejected": shared + no}  # no prompt column at all
    with_prompt = {"prompt": shared, "chosen": shared + yes, "rejected": shared + no}  # prompt repeated
    rows = [ultrafeedback, conversations, with_prompt, {"prompt": shared, "chosen": yes, "rejected": no}]
    got = build(tmp_path, rows, bpe, "preference", name="chat.jsonl").data
    for i in range(3):
        assert {**got[i], "index": 3} == got[3], i
    assert masked_text(bpe, got[0]["chosen_input_ids"], got[0]["chosen_loss_mask"]) == "yes<|im_end|>"
    ids, _ = data.tokenize_chat(bpe, shared + yes)
    assert got[0]["chosen_input_ids"] == ids
    prompts = build(tmp_path, rows, bpe, "prompt", name="chat_prompts.jsonl").data
    assert prompts[1]["prompt_ids"] == data.tokenize_chat_prompt(bpe, shared)
    # a string prompt with assistant-only message responses becomes the user turn
    row = {"prompt": "c", "chosen": yes, "rejected": "no"}
    ex = build(tmp_path, [row], bpe, "preference", name="s.jsonl").data[0]
    assert ex["chosen_input_ids"] == data.tokenize_chat(bpe, [_msg(USER, "c"), *yes])[0]


def test_prompt_only_from_strings_and_messages(tmp_path, bpe):
    rows = [{"prompt": "Tell me a joke.", "answer": "42"}]
    ds = build(tmp_path, rows, bpe, "prompt")
    assert ds.data[0]["prompt_ids"] == [*bpe.prefix_ids, *bpe.encode("Tell me a joke.")]
    assert ds.raw[ds.data[0]["index"]]["answer"] == "42"  # reward functions find their references
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    ds = build(tmp_path, [{"messages": msgs}], bpe, "prompt", name="m.jsonl")
    assert ds.data[0]["prompt_ids"] == data.tokenize_chat_prompt(bpe, msgs[:1])


def test_seq2seq_t5(tmp_path, tok_dirs):
    t5 = data.load_tokenizer(tok_dirs["sp_t5"])
    ds = build(tmp_path, [{"inputs": "translate hello", "targets": "bonjour"}], t5, "seq2seq")
    ex = ds.data[0]
    assert ex["input_ids"] == t5.encode("translate hello", add_special_tokens=True)  # T5 appends </s>
    assert ex["labels"] == t5.encode("bonjour") + [t5.eos_token_id]
    batch = data.collate([ex], ds)
    assert batch["decoder_input_ids"][0, 0] == t5.pad_token_id == ds.decoder_start_token_id
    n = len(ex["labels"])
    assert batch["decoder_input_ids"][0, 1:n].tolist() == ex["labels"][:-1]
    assert batch["loss_mask"][0].tolist() == [1] * n + [0] * (batch["labels"].shape[1] - n)


def test_truncation_left_keeps_completion(tmp_path, bpe):
    prompt, completion = "word " * 40, " the end"
    ex = build(tmp_path, [{"prompt": prompt, "completion": completion}], bpe, "sft", max_length=24).data[0]
    assert len(ex["input_ids"]) == 24 and ex["input_ids"][: len(bpe.prefix_ids)] == list(bpe.prefix_ids)
    assert masked_text(bpe, ex["input_ids"], ex["loss_mask"]) == completion + bpe.eos_token
    kept = ex["input_ids"][len(bpe.prefix_ids) : ex["loss_mask"].index(1)]
    assert kept == bpe.encode(prompt)[-len(kept) :]  # the prompt was cut from the left
    ex = build(tmp_path, [{"prompt": prompt, "completion": "x"}], bpe, "sft", max_prompt_length=8).data[0]
    assert len(ex["input_ids"]) == len(bpe.prefix_ids) + 8 + len(bpe.encode("x")) + 1


def test_truncation_drop_counts_and_error_names_row(tmp_path, bpe, caplog):
    rows = [{"prompt": "p", "completion": "short"}, {"prompt": "p " * 60, "completion": "long"}]
    with caplog.at_level(logging.WARNING, logger="jaxrlhf.data"):
        ds = build(tmp_path, rows, bpe, "sft", max_length=32, truncation="drop")
    assert len(ds) == 1 and ds.skipped == 1 and "skipped 1 bad row" in caplog.text
    with pytest.raises(data.DataError) as e:
        build(tmp_path, rows, bpe, "sft", max_length=32, truncation="error", name="e.jsonl")
    assert e.value.row == 1 and e.value.field == "completion" and "max_length" in str(e.value)
    rows = [{"prompt": "p", "completion": "long answer " * 30}]
    with pytest.raises(data.DataError, match="completion alone"):
        build(tmp_path, rows, bpe, "sft", max_length=32, name="c.jsonl")


# ----------------------------------------------------------------------------------------------- bad input
BAD_CASES = [
    # (rows, kind, bad row, field, message)
    (
        [{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": ""}],
        "sft",
        1,
        "completion",
        "is empty",
    ),
    (
        [{"prompt": "a", "completion": 3}, {"prompt": "a", "completion": "b"}],
        "sft",
        0,
        "completion",
        "got int",
    ),
    ([{"prompt": "a", "completion": "b"}, {"prompt": "a"}], "sft", 1, "completion", "missing value"),
    ([{"text": "ok"}, {"text": ["a", "list"]}], "sft", 1, "text", "got list"),
    ([{"prompt": "a", "chosen": "b", "rejected": "c", "margin": "big"}], "preference", 0, "margin", "number"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], "sft", 0, "messages", "no assistant message"),
    ([{"messages": [{"role": "bot", "content": "hi"}]}], "sft", 0, "messages", "unknown role"),
    ([{"messages": "not a list"}], "sft", 0, "messages", "list of messages"),
    ([{"chosen": "b", "rejected": "c"}], "preference", 0, "prompt", "add a prompt column"),
    ([{"prompt": "a", "chosen": "same", "rejected": "same"}], "preference", 0, "rejected", "identical"),
    ([{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "", "rejected": "c"}],
     "preference", 1, "chosen", "is empty"),
    ([{"chosen": "Human: hi Bot: yes", "rejected": "Human: hi Bot: no"}], "preference", 0, "prompt",
     "share no prefix"),
    ([{"chosen": HH + " four", "rejected": HH + " 4"}, {"chosen": HH + " four", "rejected": HH + "  "}],
     "preference", 1, "rejected", "response after the shared prompt"),
    ([{"chosen": [_msg(USER, "x"), _msg(ASSISTANT, "y")],
       "rejected": [_msg(USER, "z"), _msg(ASSISTANT, "y")]}], "preference", 0, "rejected", "no leading"),
    ([{"chosen": [_msg(USER, "x"), _msg(ASSISTANT, "y"), _msg(USER, "u"), _msg(ASSISTANT, "v")],
       "rejected": [_msg(USER, "x"), _msg(ASSISTANT, "w"), _msg(USER, "u"), _msg(ASSISTANT, "v")]}],
     "preference", 0, "chosen", "differ only in their final message"),
    ([{"prompt": [_msg(USER, "x")], "chosen": [_msg(ASSISTANT, "y")], "rejected": "y"}],
     "preference", 0, "rejected", "identical"),
    ([{"chosen": [_msg(ASSISTANT, "y")], "rejected": [_msg(ASSISTANT, "n")]}], "preference", 0, "prompt",
     "need a prompt"),
]  # fmt: skip


@pytest.mark.parametrize("rows,kind,row,field,message", BAD_CASES)
def test_bad_rows_are_named_or_skipped(tmp_path, bpe, caplog, rows, kind, row, field, message):
    path = str(tmp_path / "d.jsonl")
    with pytest.raises(data.DataError, match=message) as e:
        build(tmp_path, rows, bpe, kind)
    assert (e.value.file, e.value.row, e.value.field) == (path, row, field)
    assert f"{path}, row {row}, field {field!r}" in str(e.value)
    with caplog.at_level(logging.WARNING, logger="jaxrlhf.data"):
        if len(rows) == 1:
            with pytest.raises(ValueError, match="fewer than one batch"):
                data.Loader(
                    build(tmp_path, rows, bpe, kind, on_bad_row="skip"), 1, process_index=0, process_count=1
                )
        else:
            ds = build(tmp_path, rows, bpe, kind, on_bad_row="skip")
            assert len(ds) == len(rows) - 1 and ds.skipped == 1
    assert "skipped 1 bad row" in caplog.text and message in caplog.text


def test_missing_column_unknown_format_and_wrong_kind(tmp_path, bpe):
    with pytest.raises(data.DataError, match="column missing") as e:
        build(tmp_path, [{"prompt": "a", "answer": "b"}], bpe, "sft", format="prompt_completion")
    assert e.value.field == "completion" and e.value.file == str(tmp_path / "d.jsonl")
    with pytest.raises(data.DataError, match="cannot detect the format"):
        build(tmp_path, [{"question": "a"}], bpe, "sft")
    with pytest.raises(data.DataError, match="unknown format 'chat'"):
        data.DataConfig(path="x.jsonl", format="chat")
    with pytest.raises(data.DataError, match="cannot feed a 'preference' stage"):
        build(tmp_path, [{"text": "a"}], bpe, "preference")


def test_invalid_utf8_and_invalid_json(tmp_path, bpe, caplog):
    good = json.dumps({"prompt": "a", "completion": "b"}).encode()
    path = tmp_path / "u.jsonl"
    path.write_bytes(
        b"\n".join([good, b'{"prompt": "a", "completion": "\xff\xfe"}', good, b'{"prompt": "a",', good])
    )
    cfg = dict(path=str(path), max_length=32, cache_dir=str(tmp_path / "c"))
    with pytest.raises(data.DataError, match="invalid UTF-8") as e:
        data.build_dataset(data.DataConfig(**cfg), bpe, "sft")
    assert (e.value.file, e.value.row) == (str(path), 1)
    with caplog.at_level(logging.WARNING, logger="jaxrlhf.data"):
        ds = data.build_dataset(data.DataConfig(**cfg, on_bad_row="skip"), bpe, "sft")
    assert len(ds) == 3 and ds.skipped == 2
    assert "row 1" in caplog.text and "row 3" in caplog.text and "invalid JSON" in caplog.text
    # a lone surrogate escaped in valid JSON: names the field
    path2 = tmp_path / "s.jsonl"
    path2.write_text(good.decode() + '\n{"prompt": "a", "completion": "bad \\ud800"}\n')
    with pytest.raises(data.DataError, match="invalid UTF-8 text") as e:
        data.build_dataset(data.DataConfig(**{**cfg, "path": str(path2)}), bpe, "sft")
    assert (e.value.row, e.value.field) == (1, "completion")


# hypothesis: any single corruption of an otherwise valid file is reported at its row and field
CORRUPTIONS = {
    "missing": (lambda: None, "missing value"),
    "int": (lambda: 7, "expected a string"),
    "empty": (lambda: "  ", "is empty"),
    "surrogate": (lambda: "x\udc80", "invalid UTF-8"),
}


@given(
    n=st.integers(2, 6),
    bad=st.integers(0, 5),
    field=st.sampled_from(["completion", "text"]),
    corruption=st.sampled_from(sorted(CORRUPTIONS)),
    words=st.lists(
        st.text(alphabet="abcdé🙂 ", min_size=1, max_size=8).filter(str.strip), min_size=6, max_size=6
    ),
)
@settings(max_examples=20, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_corruption_is_named_in_process_row(bpe, n, bad, field, corruption, words):
    bad %= n
    fmt = "prompt_completion" if field == "completion" else "text"
    opts = {"max_length": 64, "max_prompt_length": None, "truncation": "left"}
    for i in range(n):
        row = {"prompt": "q", "completion": words[i]} if fmt == "prompt_completion" else {"text": words[i]}
        if i == bad:
            row[field] = CORRUPTIONS[corruption][0]()
            with pytest.raises(data.formats.RowError, match=CORRUPTIONS[corruption][1]) as e:
                data.process_row(row, fmt, "sft", bpe, opts)
            assert e.value.field == field
        else:
            ex = data.process_row(row, fmt, "sft", bpe, opts)
            assert bpe.decode(ex["input_ids"]).endswith(words[i] + bpe.eos_token)


@given(
    n=st.integers(2, 5),
    bad=st.integers(0, 4),
    corruption=st.sampled_from(["missing", "int", "empty", "surrogate", "long", "utf8"]),
)
@settings(max_examples=8, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_corruption_is_named_in_a_file(tmp_path_factory, bpe, n, bad, corruption):
    bad %= n
    tmp = tmp_path_factory.mktemp("h")
    lines = []
    for i in range(n):
        row = {"prompt": f"question {i}", "completion": f"answer {i}"}
        if i == bad and corruption in CORRUPTIONS:
            row["completion"] = CORRUPTIONS[corruption][0]()
        if i == bad and corruption == "long":
            row["completion"] = "long " * 40
        line = json.dumps(row).encode()
        if i == bad and corruption == "utf8":
            line = line.replace(b"answer", b"\xc3\x28nswer")
        lines.append(line)
    path = tmp / "h.jsonl"
    path.write_bytes(b"\n".join(lines))
    cfg = dict(path=str(path), max_length=24, cache_dir=str(tmp / "c"))
    with pytest.raises(data.DataError) as e:
        data.build_dataset(data.DataConfig(**cfg), bpe, "sft")
    assert (e.value.file, e.value.row) == (str(path), bad)
    assert e.value.field == (None if corruption == "utf8" else "completion")
    ds = data.build_dataset(data.DataConfig(**cfg, on_bad_row="skip"), bpe, "sft")
    assert len(ds) == n - 1 and ds.skipped == 1
    assert sorted(ds.data["index"]) == [i for i in range(n) if i != bad]


def test_chat_without_template_and_eval_split_of_a_file(tmp_path, tok_dirs, bpe):
    plain = data.load_tokenizer(tok_dirs["bpe"])  # this tokenizer ships no chat template
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    with pytest.raises(data.DataError, match="needs a chat template"):
        build(tmp_path, [{"messages": msgs}], plain, "sft")
    with pytest.raises(data.DataError, match="single file holds one split"):
        build(tmp_path, [{"text": "a b"}], bpe, "sft", eval_split="test", name="e.jsonl")


def test_long_conversation_is_cut_from_the_left_keeping_the_last_turn(tmp_path, bpe):
    msgs = []
    for i in range(6):
        msgs += [
            {"role": "user", "content": f"question {i} " * 3},
            {"role": "assistant", "content": f"answer {i}"},
        ]
    full_ids, full_mask = data.tokenize_chat(bpe, msgs)
    ex = build(tmp_path, [{"messages": msgs}], bpe, "sft", max_length=40).data[0]
    assert len(full_ids) > 40 and len(ex["input_ids"]) == 40
    assert ex["input_ids"][:1] == list(bpe.prefix_ids)
    assert ex["input_ids"][1:] == full_ids[-39:] and ex["loss_mask"][1:] == full_mask[-39:]
    assert masked_text(bpe, ex["input_ids"], ex["loss_mask"]).endswith("answer 5<|im_end|>")


def test_streaming_skips_and_logs_bad_rows(tmp_path, bpe, caplog):
    rows = [
        {"prompt": "a", "completion": "b"},
        {"prompt": "a", "completion": ""},
        {"prompt": "c", "completion": "d"},
    ]
    with caplog.at_level(logging.WARNING, logger="jaxrlhf.data"):
        ds = build(tmp_path, rows, bpe, "sft", streaming=True, on_bad_row="skip")
        got = list(ds.data)
    assert [r["index"] for r in got] == [0, 2]
    assert "row 1, field 'completion': is empty" in caplog.text
    with pytest.raises(data.DataError, match="row 1, field 'completion'"):
        list(build(tmp_path, rows, bpe, "sft", streaming=True, name="e.jsonl").data)
