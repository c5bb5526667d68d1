"""Tokenizers that the tests build: SentencePiece (Llama 2 / T5 layouts), tokenizer.json BPE, tiktoken."""

import re

import pytest
import sentencepiece as spm
import tiktoken
from tiktoken.load import load_tiktoken_bpe

from jaxrlhf import data
from jaxrlhf.data.tokenizer import LLAMA3_PATTERN, LLAMA3_SPECIAL_TOKENS

TEXTS = [
    "Hello world! The policy learns from the reward model.",
    "Les élèves étudient à l'école. 日本語のテキスト 🙂",
    "numbers 0 1 2 3 and symbols [ ] < > | # '",
]


@pytest.fixture(scope="module")
def toks(tok_dirs):
    return {name: data.load_tokenizer(path) for name, path in tok_dirs.items()}


@pytest.mark.parametrize("name", ["sp_llama", "bpe", "tiktoken"])
def test_round_trip_is_exact(toks, name):
    tok = toks[name]
    for text in TEXTS + ["two  spaces and\nnewline"]:
        assert tok.decode(tok.encode(text)) == text


def test_t5_round_trip_folds_whitespace(toks):
    tok = toks["sp_t5"]
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    # T5's normalizer folds runs of whitespace by design
    assert tok.decode(tok.encode("two  spaces")) == "two spaces"


def test_sentencepiece_ids_match_the_sentencepiece_library(toks, tok_dirs):
    """transformers' conversion of the .model file gives the ids that sentencepiece itself gives."""
    for name in ("sp_llama", "sp_t5"):
        sp = spm.SentencePieceProcessor(model_file=f"{tok_dirs[name]}/tokenizer.model")
        for text in TEXTS:
            assert toks[name].encode(text) == sp.encode(text), (name, text)


def test_tiktoken_ids_match_a_plain_tiktoken_encoding(toks, tok_dirs):
    ranks = load_tiktoken_bpe(tok_dirs["tiktoken"])
    enc = tiktoken.Encoding(
        "ref",
        pat_str=LLAMA3_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={t: len(ranks) + i for i, t in enumerate(LLAMA3_SPECIAL_TOKENS)},
    )
    tok = toks["tiktoken"]
    for text in TEXTS:
        assert tok.encode(text) == enc.encode(text)
    assert tok.bos_token_id == len(ranks) and tok.eos_token_id == len(ranks) + 1
    assert tok.encode("<|eot_id|>") == [tok.token_to_id("<|eot_id|>")]


def test_bos_eos_per_family(toks):
    llama, t5, bpe, tt = toks["sp_llama"], toks["sp_t5"], toks["bpe"], toks["tiktoken"]
    assert (llama.prefix_ids, llama.suffix_ids) == ((1,), ()) and llama.eos_token_id == 2
    assert (t5.prefix_ids, t5.suffix_ids) == ((), (1,)) and t5.bos_token_id is None
    assert bpe.prefix_ids == (bpe.token_to_id("<|begin_of_text|>"),) and bpe.suffix_ids == ()
    assert tt.prefix_ids == (tt.bos_token_id,) and tt.suffix_ids == ()


def test_gpt2_style_tokenizer_adds_nothing(tmp_path):
    import _tokenizers

    tok = data.load_tokenizer(_tokenizers.build_bpe_tokenizer_json(tmp_path, with_bos=False))
    assert tok.prefix_ids == () and tok.suffix_ids == ()


def test_pad_policies(tok_dirs, toks):
    assert toks["sp_t5"].pad_token_id == 0  # T5 has its own pad token, whatever the policy
    llama = toks["sp_llama"]
    assert llama.pad_token_id == llama.eos_token_id  # default policy "eos"
    assert data.load_tokenizer(tok_dirs["sp_llama"], pad_policy="unk").pad_token_id == 0
    added = data.load_tokenizer(tok_dirs["bpe"], pad_policy="add")
    assert added.pad_token_id == added.vocab_size - 1 == toks["bpe"].vocab_size
    assert added.decode([added.pad_token_id]) == "<pad>"
    tt = data.load_tokenizer(tok_dirs["tiktoken"], pad_policy="add")
    assert tt.pad_token_id == tt.vocab_size - 1 == toks["tiktoken"].vocab_size
    with pytest.raises(ValueError, match="no pad token"):
        data.load_tokenizer(tok_dirs["bpe"], pad_policy="error")
    with pytest.raises(ValueError, match="pad_policy must be one of"):
        data.load_tokenizer(tok_dirs["bpe"], pad_policy="zero")


@pytest.mark.parametrize("name", ["sp_llama", "bpe", "tiktoken"])
def test_save_and_reload_keeps_ids_pad_and_template(toks, tok_dirs, tmp_path, name):
    tok = data.load_tokenizer(tok_dirs[name], chat_template="chatml")
    tok.save_pretrained(str(tmp_path / "saved"))
    again = data.load_tokenizer(str(tmp_path / "saved"))
    for text in TEXTS:
        assert again.encode(text) == tok.encode(text)
    assert again.chat_template == data.TEMPLATES["chatml"]
    assert (again.pad_token_id, again.eos_token_id, again.prefix_ids) == (
        tok.pad_token_id,
        tok.eos_token_id,
        tok.prefix_ids,
    )


def test_tiktoken_from_a_directory_like_llama3_original(tok_dirs, tmp_path):
    """Llama 3 ships its ranks as original/tokenizer.model (not a SentencePiece file)."""
    import shutil

    (tmp_path / "original").mkdir()
    shutil.copyfile(tok_dirs["tiktoken"], tmp_path / "original" / "tokenizer.model")
    tok = data.load_tokenizer(str(tmp_path / "original"))
    assert tok.tiktoken is not None and tok.decode(tok.encode(TEXTS[1])) == TEXTS[1]


def test_bad_paths(tok_dirs, tmp_path):
    with pytest.raises(FileNotFoundError):
        data.load_tokenizer(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match=re.escape("tokenizer_config.json")):
        data.load_tokenizer(f"{tok_dirs['sp_llama']}/tokenizer.model")
    (tmp_path / "junk.tiktoken").write_text("not base64 ranks\n")
    with pytest.raises(ValueError, match="not a tiktoken BPE ranks file"):
        data.load_tokenizer(str(tmp_path / "junk.tiktoken"))
    with pytest.raises(ValueError, match="unknown chat template"):
        data.load_tokenizer(tok_dirs["bpe"], chat_template="vicuna")
