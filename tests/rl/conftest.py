"""Fixtures of the RL tests: the bundled tiny task's tokenizer (trained once per session) and a second,
different one (for reward models whose tokenizer is not the policy's)."""

from __future__ import annotations

import pytest

from jaxrlhf import data
from jaxrlhf.assets import tiny


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """The tiny task's SentencePiece tokenizer: 320 ids (``tests.rl._tiny.VOCAB``), <s> = 1, </s> = 2."""
    return data.load_tokenizer(tiny.tokenizer_dir(str(tmp_path_factory.mktemp("rl_tok") / "tiny")))


@pytest.fixture(scope="session")
def other_tokenizer(tmp_path_factory):
    """Another SentencePiece tokenizer (trained on tests.data._tokenizers.CORPUS, 400 ids)."""
    from tests.data._tokenizers import train_sentencepiece

    return data.load_tokenizer(train_sentencepiece(tmp_path_factory.mktemp("rl_tok2"), "llama"))
