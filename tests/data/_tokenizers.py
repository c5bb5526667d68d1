"""Builders of tiny tokenizers for tests: every test makes its own, nothing is downloaded.

- :func:`train_sentencepiece` trains a SentencePiece model and lays it out as a Hugging Face directory
  (``tokenizer.model`` + ``tokenizer_config.json``) with Llama 2 (BPE, byte fallback, ``<s>``=1 ``</s>``=2)
  or T5 (unigram, ``<pad>``=0 ``</s>``=1 ``<unk>``=2, no BOS) conventions.
- :func:`build_bpe_tokenizer_json` trains a byte-level BPE (GPT-2 / Llama 3 style ``tokenizer.json``).
- :func:`build_tiktoken` trains tiktoken ranks and writes a raw ``*.tiktoken`` ranks file (Llama 3's
  ``original/tokenizer.model`` format).
"""

from __future__ import annotations

import base64
import io
import json
import os

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A reward model scores answers; the policy learns from the scores.",
    "User: what is two plus two? Assistant: two plus two is four.",
    "Hello world! This is a tiny corpus for a tiny tokenizer.",
    "Packing puts several short examples into one row of tokens.",
    "system prompts tell the assistant how to behave in a chat.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 and punctuation , . ; : ! ? ( ) [ ] < > / | - _ = + * # '",
    "Les élèves étudient à l'école. Über alles, schön. 日本語のテキスト。 emoji 🙂 ok.",
    "instruction input response question answer context summary translate explain",
] * 20

LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|finetune_right_pad_id|>",
]


def train_sentencepiece(tmp_path, kind: str = "llama", vocab_size: int | None = None) -> str:
    """Train a SentencePiece model into ``tmp_path/f"sp_{kind}"``; return the directory (an HF layout)."""
    import sentencepiece as spm

    out_dir = os.path.join(str(tmp_path), f"sp_{kind}")
    os.makedirs(out_dir, exist_ok=True)
    model = io.BytesIO()
    if kind == "llama":
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(CORPUS),
            model_writer=model,
            vocab_size=vocab_size or 400,
            model_type="bpe",
            byte_fallback=True,
            character_coverage=1.0,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            split_digits=True,
            add_dummy_prefix=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            minloglevel=2,
        )
        config = {
            "tokenizer_class": "LlamaTokenizer",
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "add_bos_token": True,
            "add_eos_token": False,
            "legacy": False,
        }
    elif kind == "t5":
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(CORPUS),
            model_writer=model,
            vocab_size=vocab_size or 150,
            model_type="unigram",
            character_coverage=1.0,
            pad_id=0,
            eos_id=1,
            unk_id=2,
            bos_id=-1,
            minloglevel=2,
        )
        config = {
            "tokenizer_class": "T5Tokenizer",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "pad_token": "<pad>",
            "extra_ids": 0,
        }
    else:
        raise ValueError(f"unknown SentencePiece kind {kind!r}")
    with open(os.path.join(out_dir, "tokenizer.model"), "wb") as f:
        f.write(model.getvalue())
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return out_dir


def build_bpe_tokenizer_json(
    tmp_path,
    vocab_size: int = 320,
    chat_template: str | None = None,
    name: str = "bpe",
    with_bos: bool = True,
) -> str:
    """Train a byte-level BPE ``tokenizer.json`` (Llama 3 / GPT-2 style); return the directory.

    ``with_bos``: prepend ``<|begin_of_text|>`` like Llama 3 (else nothing, like GPT-2). No pad token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    out_dir = os.path.join(str(tmp_path), name)
    os.makedirs(out_dir, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=LLAMA3_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    if with_bos:
        bos_id = tok.token_to_id("<|begin_of_text|>")
        tok.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A",
            pair="<|begin_of_text|> $A <|begin_of_text|> $B",
            special_tokens=[("<|begin_of_text|>", bos_id)],
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>" if with_bos else "<|end_of_text|>",
        "eos_token": "<|end_of_text|>",
        "model_input_names": ["input_ids", "attention_mask"],
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return out_dir


LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def build_tiktoken(tmp_path, vocab_size: int = 300) -> str:
    """Train tiktoken BPE ranks on the tiny corpus and write them as a raw ranks file; return its path."""
    from tiktoken._educational import bpe_train

    ranks = bpe_train("\n".join(CORPUS[: len(CORPUS) // 20]), vocab_size, LLAMA3_PATTERN, visualise=None)
    path = os.path.join(str(tmp_path), "tokenizer.tiktoken")
    with open(path, "w") as f:
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(f"{base64.b64encode(token).decode()} {rank}\n")
    return path
