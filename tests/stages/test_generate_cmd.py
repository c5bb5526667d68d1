"""``jaxrlhf generate`` on a tiny HF directory with a trained SentencePiece tokenizer and a chat template."""

from __future__ import annotations

import io
import json
import os
import shutil

import jax
import numpy as np
import pytest

pytest.importorskip("torch")

from jaxrlhf import data, generation, models  # noqa: E402
from jaxrlhf.assets.tiny import tokenizer_dir  # noqa: E402
from jaxrlhf.data.templates import tokenize_chat_prompt  # noqa: E402
from jaxrlhf.stages.generate_cmd import run_generate  # noqa: E402
from tests.models._hf_tiny import tiny_hf_causal_lm  # noqa: E402

COMMON = ["--max-new-tokens", "6", "--temperature", "0", "--chat-template", "chatml", "--seed", "3"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("gencmd")
    tok_dir = tokenizer_dir(str(root / "tok"), vocab_size=320)
    _, path = tiny_hf_causal_lm(
        "llama3", root, vocab_size=320, pad_token_id=0, bos_token_id=1, eos_token_id=2
    )
    for name in os.listdir(tok_dir):
        if not name.endswith(".json") or name.startswith("tokenizer"):
            shutil.copy(os.path.join(tok_dir, name), path)
    return path


def _expected(path, prompts):
    """What the command must print: generate() on the chat-templated, left-padded prompts, decoded."""
    tok = data.load_tokenizer(path, chat_template="chatml")
    spec, params = models.load_pretrained(path)
    ids = [tokenize_chat_prompt(tok, [{"role": "user", "content": p}]) for p in prompts]
    width = max(map(len, ids))
    arr = np.array([[0] * (width - len(x)) + x for x in ids], np.int32)
    mask = np.array([[0] * (width - len(x)) + [1] * len(x) for x in ids], np.int32)
    stops = {2} | {i for i in map(tok.token_to_id, ["<|im_end|>"]) if i is not None}
    cfg = generation.SamplingConfig(max_new_tokens=6, temperature=0.0, stop_token_ids=tuple(sorted(stops)))
    res = generation.generate(spec, params, arr, mask, jax.random.key(0), cfg)
    toks, valid = np.asarray(res.tokens), np.asarray(res.mask)
    return [[int(t) for t in toks[b][valid[b]]] for b in range(len(prompts))], tok


def test_batch_prompts_to_jsonl(model_dir, tmp_path):
    prompts = ["What is 2+3?", "Say hello politely"]
    out_file = tmp_path / "out.jsonl"
    stdout = io.StringIO()
    argv = [
        "--checkpoint",
        model_dir,
        *sum([["--prompt", p] for p in prompts], []),
        "--output",
        str(out_file),
    ]
    assert run_generate(argv + COMMON, stdout=stdout) == 0
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    expected, tok = _expected(model_dir, prompts)
    assert all(expected), "greedy should produce at least one token per prompt"
    assert [r["prompt"] for r in rows] == prompts
    assert [r["tokens"] for r in rows] == expected
    assert [r["completion"] for r in rows] == [tok.decode(e, skip_special_tokens=True) for e in expected]
    assert ">>> What is 2+3?" in stdout.getvalue()


def test_interactive_streams_the_same_reply(model_dir, tmp_path):
    expected, tok = _expected(model_dir, ["What is 2+3?"])
    stdout = io.StringIO()
    argv = ["--checkpoint", model_dir, "--interactive", "--chunk", "2", *COMMON]
    assert run_generate(argv, stdin=io.StringIO("What is 2+3?\n/quit\n"), stdout=stdout) == 0
    assert tok.decode(expected[0], skip_special_tokens=True) + "\n" in stdout.getvalue()


def test_prompts_file_errors_name_the_row(model_dir, tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"nope": 1}\n')
    with pytest.raises(SystemExit, match=r"p.jsonl row 1: field 'prompt'"):
        run_generate(["--checkpoint", model_dir, "--prompts-file", str(bad), *COMMON])
    with pytest.raises(SystemExit, match="not a directory"):
        run_generate(["--checkpoint", str(tmp_path / "missing"), "--prompt", "x"])
