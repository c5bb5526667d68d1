"""Tokenizers built once per test session (each test module reuses them; nothing is downloaded)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import _tokenizers  # noqa: E402


@pytest.fixture(scope="session")
def tok_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    return {
        "sp_llama": _tokenizers.train_sentencepiece(root, "llama"),
        "sp_t5": _tokenizers.train_sentencepiece(root, "t5"),
        "bpe": _tokenizers.build_bpe_tokenizer_json(root),
        "tiktoken": _tokenizers.build_tiktoken(root),
    }


@pytest.fixture(autouse=True, scope="session")
def _quiet_datasets():
    import datasets

    datasets.disable_progress_bars()
