"""Hostile data: hypothesis writes JSON-lines files of every format (preference, prompt, messages,
prompt/completion, text, alpaca (as SFT rows and as prompts), ShareGPT ``conversations`` of ``from`` /
``value`` turns) whose fields hold anything (missing, null, numbers, booleans, empty or blank
strings, lone surrogates, lists, objects, mixed types across rows, non-object lines, broken JSON) and builds
the dataset twice, ``on_bad_row=error`` and ``skip``.

Checked on every file: the only exception is a :class:`DataError` naming the file; a row error names the
row, its 1-based line, the field and the ``data.on_bad_row=skip`` way out, and is one of the rows; under
``skip`` every row is either kept or counted as skipped (never dropped silently), and a file that builds
under ``error`` builds the same under ``skip`` with nothing skipped. Also: several bad rows in one error,
line numbers with blank lines, a CSV row's line.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import hypothesis
import hypothesis.strategies as st
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "data"))
import _tokenizers  # noqa: E402

from jaxrlhf import data  # noqa: E402
from jaxrlhf.data.errors import SKIP_HINT, BadRowsError  # noqa: E402

# case -> (data.format, dataset kind, the columns a row of it has)
FORMATS = {
    "preference": ("preference", "preference", ("prompt", "chosen", "rejected", "margin")),
    "prompt": ("prompt", "prompt", ("prompt",)),
    "messages": ("messages", "sft", ("messages",)),
    "prompt_completion": ("prompt_completion", "sft", ("prompt", "completion")),
    "text": ("text", "sft", ("text",)),
    "alpaca": ("alpaca", "sft", ("instruction", "input", "output")),
    "alpaca_prompt": ("alpaca", "prompt", ("instruction", "input", "output")),  # PPO / GRPO prompts
    "sharegpt": ("messages", "sft", ("conversations",)),  # FastChat / ShareGPT: from / value turns
}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return data.load_tokenizer(_tokenizers.build_bpe_tokenizer_json(tmp_path_factory.mktemp("hostile")))


_text = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["", "   ", "\n", "ok answer", "\ud800", "a\x00b", "<|endoftext|>"]),
)
_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "human", "gpt", "robot", None, 3])},
    optional={"content": st.one_of(_text, st.none(), st.integers())},
)
_turn = st.fixed_dictionaries(  # a ShareGPT turn, some with role / content keys or both spellings
    {"from": st.sampled_from(["human", "gpt", "system", "user", "bot", None, 1])},
    optional={
        "value": st.one_of(_text, st.none(), st.integers()),
        "role": st.sampled_from(["user", "assistant", "gpt"]),
        "content": _text,
    },
)
_value = st.one_of(
    _text,
    st.none(),
    st.integers(-5, 5),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.booleans(),
    st.lists(_message, max_size=3),
    st.lists(st.integers(0, 3), max_size=2),
    st.dictionaries(st.sampled_from(["a", "role"]), _text, max_size=2),
)
_VALUES = {"sharegpt": st.one_of(_value, st.lists(_turn, max_size=3))}


@st.composite
def rows(draw, fmt):
    columns = FORMATS[fmt][2]
    out = []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["good", "good", "fuzz", "line"]))
        if kind == "line":  # a line that is not a JSON object at all
            out.append(draw(st.sampled_from(['{"prompt": ', "[1, 2]", '"text"', "{bad json}", "null"])))
            continue
        row = {}
        for col in columns:
            if kind == "good":
                row[col] = _good(fmt, col)
            elif draw(st.booleans()):
                row[col] = draw(_VALUES.get(fmt, _value))
        out.append(row)
    return out


def _good(fmt, col):
    if fmt == "messages":
        return [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello you"}]
    if fmt == "sharegpt":
        return [{"from": "human", "value": "hi there"}, {"from": "gpt", "value": "hello you"}]
    return {"chosen": " yes please", "rejected": " no", "margin": 1.0}.get(col, "some words here")


def _write(path, rows):
    with open(path, "w", encoding="utf-8", errors="surrogatepass") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


def _build(path, tok, fmt, cache, on_bad_row):
    form, kind, _ = FORMATS[fmt]
    cfg = data.DataConfig(
        path=path, format=form, max_length=64, template="chatml", on_bad_row=on_bad_row, cache_dir=cache
    )
    return data.build_dataset(cfg, tok, kind)


def _check_error(e: data.DataError, path: str, n: int) -> None:
    msg = str(e)
    assert path in msg, msg
    assert "Traceback" not in msg and "jax._src" not in msg, msg
    errors = e.errors if isinstance(e, BadRowsError) else [e] if e.row is not None else []
    for err in errors:
        assert 0 <= err.row < n, msg
        assert f"row {err.row}" in msg and "of the file" in msg, msg
        if err.field is not None:
            assert repr(err.field) in msg, msg
    if errors:
        assert SKIP_HINT in msg, msg


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_fuzzed_rows_fail_clearly_or_skip_counted(tok, fmt):
    @hypothesis.settings(max_examples=25, deadline=None, derandomize=True)
    @hypothesis.given(rows(fmt))
    def check(file_rows):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "rows.jsonl")
            _write(path, file_rows)
            n = len(file_rows)
            try:
                strict = _build(path, tok, fmt, os.path.join(d, "c1"), "error")
            except data.DataError as e:
                _check_error(e, path, n)
                strict, strict_error = None, e
            try:
                lenient = _build(path, tok, fmt, os.path.join(d, "c2"), "skip")
            except data.DataError as e:  # only what cannot be skipped: a file-level problem
                _check_error(e, path, n)
                assert e.row is None, str(e)
                assert strict is None, "skip mode failed where error mode built the dataset"
                return
            assert len(lenient.data) + lenient.skipped == n
            if strict is not None:
                assert lenient.skipped == 0 and len(strict.data) == n
                assert lenient.data[:] == strict.data[:]
            elif strict_error.row is not None:
                assert lenient.skipped >= 1

    check()


def test_every_unreadable_line_in_one_error_with_its_line_number(tok, tmp_path):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"prompt": "p", "completion": "some words"})
    path.write_text("\n".join([good, "", "{oops", good, "\n", "[1]", good, "{also bad"]) + "\n")
    with pytest.raises(BadRowsError) as e:
        _build(str(path), tok, "prompt_completion", str(tmp_path / "c"), "error")
    msg = str(e.value)
    assert "3 bad rows" in msg
    assert "row 1 (line 3 of the file): invalid JSON" in msg  # blank line 2 is not a row
    assert "row 3 (line 7 of the file): expected a JSON object per line" in msg
    assert "row 5 (line 9 of the file): invalid JSON" in msg
    assert "line 3 of the file" in msg and "column" in msg and SKIP_HINT in msg
    assert [x.row for x in e.value.errors] == [1, 3, 5]
    ds = _build(str(path), tok, "prompt_completion", str(tmp_path / "c2"), "skip")
    assert len(ds.data) == 3 and ds.skipped == 3


def test_type_change_across_rows_names_row_and_field(tok, tmp_path):
    path = tmp_path / "mixed.jsonl"
    rows = [{"prompt": "p", "completion": "words here"}] * 3 + [
        {"prompt": {"text": "p"}, "completion": "x y"}
    ]
    _write(path, rows)
    with pytest.raises(data.DataError) as e:
        _build(str(path), tok, "prompt_completion", str(tmp_path / "c"), "error")
    assert (e.value.row, e.value.field) == (3, "prompt") and "line 4 of the file" in str(e.value)


def test_bad_row_error_has_the_line_and_hint(tok, tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = [{"prompt": "p", "completion": "words here"}] * 50 + [{"prompt": "p", "completion": "  "}]
    _write(path, rows)
    with pytest.raises(data.DataError) as e:
        _build(str(path), tok, "prompt_completion", str(tmp_path / "c"), "error")
    assert f"{path}, row 50, field 'completion' (line 51 of the file): is empty" in str(e.value)
    assert SKIP_HINT in str(e.value)


def test_csv_row_line_counts_the_header_and_quoted_newlines(tok, tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text('prompt,completion\np,"two\nlines"\np,words\np,\n')
    with pytest.raises(data.DataError) as e:
        _build(str(path), tok, "prompt_completion", str(tmp_path / "c"), "error")
    assert e.value.row == 2 and "line 5 of the file" in str(e.value)


def test_every_bad_row_in_one_error_up_to_the_limit(tok, tmp_path):
    """Rows that read as JSON but are bad (empty / missing / wrong-typed fields): every one of them is
    named in one error with its 1-based line (blank lines counted), up to ``MAX_REPORTED``, then a count."""
    from jaxrlhf.data.errors import MAX_REPORTED

    good = json.dumps({"prompt": "p", "completion": "some words"})
    bad = [
        json.dumps({"prompt": "p", "completion": "  "}),
        json.dumps({"prompt": "p"}),
        json.dumps({"prompt": "p", "completion": None}),
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join([good, bad[0], "", good, bad[1], bad[2], good]) + "\n")
    with pytest.raises(BadRowsError) as e:
        _build(str(path), tok, "prompt_completion", str(tmp_path / "c"), "error")
    msg = str(e.value)
    assert msg.startswith(f"{path}: 3 bad rows:") and SKIP_HINT in msg and "data.on_bad_row=skip" in msg
    assert f"{path}, row 1, field 'completion' (line 2 of the file): is empty" in msg
    assert f"{path}, row 3, field 'completion' (line 5 of the file)" in msg  # the blank line 3 counted
    assert f"{path}, row 4, field 'completion' (line 6 of the file)" in msg
    assert [x.row for x in e.value.errors] == [1, 3, 4] and e.value.total == 3
    ds = _build(str(path), tok, "prompt_completion", str(tmp_path / "c2"), "skip")
    assert len(ds.data) == 3 and ds.skipped == 3

    many = tmp_path / "many.jsonl"
    n = MAX_REPORTED + 5
    many.write_text("\n".join([good] + [bad[0]] * n) + "\n")
    with pytest.raises(BadRowsError) as e:
        _build(str(many), tok, "prompt_completion", str(tmp_path / "c3"), "error")
    msg = str(e.value)
    assert msg.startswith(f"{many}: {n} bad rows:") and "... and 5 more" in msg
    assert len(e.value.errors) == MAX_REPORTED and e.value.total == n
    assert f"row {MAX_REPORTED}, field 'completion' (line {MAX_REPORTED + 1} of the file)" in msg
    assert f"row {MAX_REPORTED + 1}," not in msg


def test_alpaca_and_sharegpt_bad_rows_name_row_and_field(tok, tmp_path):
    turns = [{"from": "human", "value": "hi there"}, {"from": "gpt", "value": "hello you"}]
    cases = [
        ("sharegpt", [{"conversations": turns}, {"conversations": [turns[0], {"from": "bot", "value": "x"}]}],
         "row 1, field 'conversations' (line 2 of the file): message 1 has unknown role 'bot' in 'from'"),
        ("sharegpt", [{"conversations": turns}, {"conversations": [turns[0], {"from": "gpt", "value": 7}]}],
         "row 1, field 'conversations' (line 2 of the file): message 1 content must be a string, got int"),
        ("alpaca", [{"instruction": "do it", "output": "done"}, {"instruction": "do it", "input": 3,
                                                               "output": "done"}],
         "row 1, field 'input' (line 2 of the file): expected a string, got int"),
        ("alpaca", [{"instruction": "do it", "output": "done"}, {"instruction": " ", "output": "done"}],
         "row 1, field 'instruction' (line 2 of the file): is empty"),
    ]  # fmt: skip
    for i, (fmt, file_rows, want) in enumerate(cases):
        path = tmp_path / f"rows{i}.jsonl"
        _write(path, file_rows)
        with pytest.raises(data.DataError) as e:
            _build(str(path), tok, fmt, str(tmp_path / f"c{i}"), "error")
        assert f"{path}, {want}" in str(e.value), str(e.value)
        ds = _build(str(path), tok, fmt, str(tmp_path / f"s{i}"), "skip")
        assert len(ds.data) == 1 and ds.skipped == 1
