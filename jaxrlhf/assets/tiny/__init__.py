"""The bundled tiny task: data files, its ground-truth rule, a SentencePiece tokenizer trained on first use.

Files (made by ``scripts/make_tiny_data.py``, committed): ``sft.jsonl``, ``prefs.jsonl``, ``prompts.jsonl``,
``corpus.txt``. The rule (:func:`check`) lives in ``rule.py``; reward models never see it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile

from jaxrlhf.assets.tiny.rule import check, is_correct, is_polite, parse_prompt, solve

__all__ = [
    "ASSET_DIR",
    "asset_path",
    "check",
    "is_correct",
    "is_polite",
    "parse_prompt",
    "solve",
    "tokenizer_dir",
]

ASSET_DIR = os.path.dirname(os.path.abspath(__file__))
_STAMP = "jaxrlhf_tiny_stamp.json"


def asset_path(name: str) -> str:
    """Absolute path of a bundled file (``"sft.jsonl"``, ``"corpus.txt"`` ...); error when it is missing."""
    path = os.path.join(ASSET_DIR, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such bundled file; run scripts/make_tiny_data.py")
    return path


def tokenizer_dir(cache_dir: str, vocab_size: int = 320, corpus: str | None = None) -> str:
    """A Llama-style SentencePiece tokenizer directory trained on the bundled corpus, cached in ``cache_dir``.

    BPE with byte fallback and split digits; ``<unk>`` = 0, ``<s>`` = 1, ``</s>`` = 2 (Llama 2 conventions);
    laid out like an HF repo (``tokenizer.model`` + ``tokenizer_config.json``) so ``data.load_tokenizer``
    reads it. Training is single-threaded on a fixed, sorted corpus, so the model file is the same bytes on
    every machine; the cache is keyed by the corpus hash and ``vocab_size`` and reused when they match.
    """
    import sentencepiece as spm

    corpus = corpus or asset_path("corpus.txt")
    with open(corpus, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    stamp = {"corpus_sha256": digest, "vocab_size": vocab_size, "version": 1}
    stamp_path = os.path.join(cache_dir, _STAMP)
    if os.path.isfile(stamp_path):
        with open(stamp_path) as f:
            if json.load(f) == stamp:
                return cache_dir
        raise FileExistsError(
            f"{cache_dir}: holds a tiny tokenizer trained with other settings ({stamp_path}); "
            "delete the directory or choose another tokenizer cache"
        )
    with open(corpus, encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f if line.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        shuffle_input_sentence=False,
        input_sentence_size=0,
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
    parent = os.path.dirname(os.path.abspath(cache_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tiny_tok_", dir=parent)
    with open(os.path.join(tmp, "tokenizer.model"), "wb") as f:
        f.write(model.getvalue())
    with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=1)
    with open(os.path.join(tmp, _STAMP), "w") as f:
        json.dump(stamp, f)
    if os.path.isdir(cache_dir) and not os.listdir(cache_dir):
        os.rmdir(cache_dir)
    try:
        os.rename(tmp, cache_dir)  # atomic: another process may have won the race with the same result
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.isfile(stamp_path):
            raise
    return cache_dir
