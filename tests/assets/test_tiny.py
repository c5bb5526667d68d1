"""The bundled tiny task: deterministic generator, the ground-truth rule, data statistics, tokenizer."""

from __future__ import annotations

import filecmp
import hashlib
import importlib.util
import json
import os
import shutil

import pytest

from jaxrlhf.assets import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FILES = ("sft.jsonl", "prefs.jsonl", "prompts.jsonl", "corpus.txt")


def rows(name):
    with open(tiny.asset_path(name)) as f:
        return [json.loads(line) for line in f]


def test_generator_reproduces_the_committed_files(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "make_tiny_data", os.path.join(ROOT, "scripts", "make_tiny_data.py")
    )
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    shutil.copy(os.path.join(tiny.ASSET_DIR, "rule.py"), tmp_path / "rule.py")
    counts = gen.generate(str(tmp_path), seed=0)
    assert counts["sft"] == 2000 and counts["prefs"] == 2000 and counts["prompts"] == 500
    for name in FILES:
        assert filecmp.cmp(tmp_path / name, tiny.asset_path(name), shallow=False), name


@pytest.mark.parametrize(
    "prompt, response, score",
    [
        ("What is 7 + 5?", "Sure! 7 + 5 = 12. Hope this helps!", 1.0),
        ("What is 7 + 5?", "12", 0.5),
        ("What is 7 + 5?", "7 + 5 = 12", 0.5),
        ("What is 7 + 5?", "7 + 5 = 2", 0.0),
        ("What is 7 + 5?", " 12 ", 0.5),
        ("What is 7 + 5?", "Sure! 7 + 5 = 13. Hope this helps!", 0.5),
        ("What is 7 + 5?", "Sure! 12 Hope this helps!", 1.0),
        ("What is 7 + 5?", "Sure! 7 - 5 = 12. Hope this helps!", 0.5),  # restated the wrong question
        ("What is 7 + 5?", "13", 0.0),
        ("What is 7 + 5?", "twelve", 0.0),
        ("What is 7 + 5?", "Sure! Hope this helps!", 0.5),
        ("What is 7 + 5?", "", 0.0),
        ("What is 9 - 4?", "Sure! 9 - 4 = 5. Hope this helps!", 1.0),
        ("What is 9 - 4?", "5", 0.5),
        ("What is 9 - 4?", "13", 0.0),
        ("What is 9 - 4?", "9 - 4 = 13", 0.0),
    ],
)
def test_rule(prompt, response, score):
    assert tiny.check(prompt, response) == score


def test_rule_rejects_foreign_prompts():
    with pytest.raises(ValueError, match="not a tiny-task prompt"):
        tiny.check("Sort 3 1 2.", "1 2 3")


def _misread_operator(prompt: str) -> int:
    """The documented wrong answer: the other operation's result, else the product, else the answer + 1."""
    kind, (a, b) = tiny.parse_prompt(prompt)
    right = int(tiny.solve(prompt))
    return next(v for v in (abs(a - b) if kind == "add" else a + b, a * b, right + 1) if v != right)


def test_data_statistics_match_the_documented_mixture():
    sft = rows("sft.jsonl")
    polite = sum(tiny.is_polite(r["completion"]) for r in sft) / len(sft)
    correct = sum(tiny.is_correct(r["prompt"], r["completion"]) for r in sft) / len(sft)
    assert 0.45 < polite < 0.55 and 0.82 < correct < 0.88
    prefs = rows("prefs.jsonl")
    agree = [tiny.check(r["prompt"], r["chosen"]) > tiny.check(r["prompt"], r["rejected"]) for r in prefs]
    assert all(tiny.check(r["prompt"], r["chosen"]) != tiny.check(r["prompt"], r["rejected"]) for r in prefs)
    assert 0.92 < sum(agree) / len(agree) < 0.97  # 5% annotator noise
    answers = [(r["prompt"], r["completion"]) for r in sft]
    answers += [(r["prompt"], r[k]) for r in prefs for k in ("chosen", "rejected")]
    for prompt, answer in answers:  # both styles restate the question; wrong answers misread the operator
        kind, (a, b) = tiny.parse_prompt(prompt)
        body = answer[len("Sure! ") : -len(". Hope this helps!")] if tiny.is_polite(answer) else answer
        restated, _, result = body.rpartition(" = ")
        assert restated == f"{a} {'+' if kind == 'add' else '-'} {b}", answer
        expected = tiny.solve(prompt) if tiny.is_correct(prompt, answer) else str(_misread_operator(prompt))
        assert result == expected, (prompt, answer)
    prompts = rows("prompts.jsonl")
    assert all(tiny.parse_prompt(r["prompt"]) for r in prompts) and len(prompts) == 500


def test_tokenizer_is_deterministic_and_cached(tmp_path):
    from jaxrlhf import data

    a = tiny.tokenizer_dir(str(tmp_path / "a"))
    b = tiny.tokenizer_dir(str(tmp_path / "b"))
    digest = [
        hashlib.sha256(open(os.path.join(d, "tokenizer.model"), "rb").read()).hexdigest() for d in (a, b)
    ]
    assert digest[0] == digest[1]
    mtime = os.path.getmtime(os.path.join(a, "tokenizer.model"))
    assert tiny.tokenizer_dir(a) == a and os.path.getmtime(os.path.join(a, "tokenizer.model")) == mtime
    with pytest.raises(FileExistsError, match="other settings"):
        tiny.tokenizer_dir(a, vocab_size=300)
    tok = data.load_tokenizer(a)
    assert tok.vocab_size == 320 and tok.bos_token_id == 1 and tok.eos_token_id == 2
    text = "Sure! 7 + 5 = 12. Hope this helps!"
    assert tok.decode(tok.encode(text)) == text
    assert [tok.decode([i]) for i in tok.encode("12")][-2:] == ["1", "2"]  # digits are split
