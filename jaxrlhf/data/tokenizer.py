"""Tokenizers from local files: SentencePiece and ``tokenizer.json`` through transformers, raw BPE ranks
through tiktoken, behind one small :class:`Tokenizer` wrapper.

What :func:`load_tokenizer` accepts:

- an HF tokenizer directory: ``tokenizer.model`` (SentencePiece: Llama 2, T5 / Flan-T5, UL2) with a
  ``tokenizer_config.json`` naming its class, or ``tokenizer.json`` (Llama 3, BLOOM, OPT, GPT-2 ...). Loaded
  with ``transformers.AutoTokenizer`` (offline: ``local_files_only``).
- a raw tiktoken ranks file (``*.tiktoken``, or Llama 3's ``original/tokenizer.model``), or a directory
  holding ``tokenizer.tiktoken`` (what :meth:`Tokenizer.save_pretrained` writes). Loaded with ``tiktoken``;
  special tokens follow Llama 3 (``<|begin_of_text|>`` = BOS, ``<|end_of_text|>`` = EOS, ``<|eot_id|>``
  ...), ids after the ranks.

Pad-token policy (``pad_policy``) for tokenizers without a pad token (Llama, GPT-2, OPT-less ...):

- ``"eos"`` (default): pad with the EOS id. Safe because every batch carries ``attention_mask`` and
  ``loss_mask``: pads are never attended to nor trained on.
- ``"unk"``: pad with the UNK id (Llama 2's classic choice); error when there is no UNK.
- ``"add"``: add a new ``<pad>`` token. The vocabulary grows by one, so the model's embeddings must be
  resized (check ``tokenizer.vocab_size <= spec.vocab_size``).
- ``"error"``: refuse tokenizers without a pad token.

A tokenizer that has a pad token keeps it, whatever the policy.

Nothing in a tokenizer directory runs: ``trust_remote_code`` is off unless the caller turns it on, so a
``tokenizer_config.json`` whose ``auto_map`` points at a Python file is refused with a message (never a
``[y/N]`` question on the terminal, which would hang a batch job); the JSON files are checked before
transformers reads them, and a truncated or corrupt file is a :class:`TokenizerError` that names it.

BOS / EOS per family: ``prefix_ids`` / ``suffix_ids`` are what the tokenizer itself puts around one sequence
(Llama 2/3: BOS before; OPT: ``</s>`` before; T5: EOS after; GPT-2 / BLOOM: nothing). The data layer starts
every decoder-only sequence with ``prefix_ids`` and ends completions with ``eos_token_id`` (the model must
learn to stop); encoder-decoder inputs and targets end with EOS like T5 pre-training.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from typing import Any

from jaxrlhf.data.errors import TokenizerError

PAD_POLICIES = ("eos", "unk", "add", "error")

# Llama 3's pre-tokenizer pattern and special tokens (ids follow the ranks, in this order)
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
) + tuple(f"<|reserved_special_token_{2 + i}|>" for i in range(256 - 11))
_TIKTOKEN_META = "jaxrlhf_tiktoken.json"


class Tokenizer:
    """One interface over an HF tokenizer (``.hf``) or a ``tiktoken.Encoding`` (``.tiktoken``).

    Attributes: ``bos_token_id``, ``eos_token_id``, ``pad_token_id``, ``unk_token_id`` (int or None), their
    strings ``bos_token`` ..., ``prefix_ids`` / ``suffix_ids`` (tuples, see the module docstring),
    ``chat_template`` (Jinja string or None: the tokenizer's own, or the one given to :func:`load_tokenizer`),
    ``vocab_size`` (number of ids, added tokens included), ``path``, ``pad_policy``.
    """

    def __init__(
        self,
        *,
        path: str,
        hf: Any = None,
        encoding: Any = None,
        bos_token: str | None,
        eos_token: str | None,
        pad_token: str | None,
        unk_token: str | None,
        chat_template: str | None,
        pad_policy: str,
        meta: dict | None = None,
    ):
        self.path, self.hf, self.tiktoken, self.pad_policy = path, hf, encoding, pad_policy
        self._meta = meta or {}
        self.bos_token, self.eos_token, self.unk_token = bos_token, eos_token, unk_token
        self.chat_template = chat_template
        self.bos_token_id = self.token_to_id(bos_token)
        self.eos_token_id = self.token_to_id(eos_token)
        self.unk_token_id = self.token_to_id(unk_token)
        if self.eos_token_id is None:
            raise ValueError(
                f"{path}: the tokenizer has no EOS token; set eos_token in tokenizer_config.json"
            )
        self.pad_token, self.pad_token_id = self._resolve_pad(pad_token)
        probe = "a b"
        plain = self.encode(probe)
        full = self.encode(probe, add_special_tokens=True)
        start = next(
            (i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain), None
        )
        if start is None:
            raise ValueError(f"{path}: cannot tell which special tokens the tokenizer adds around a text")
        self.prefix_ids = tuple(full[:start])
        self.suffix_ids = tuple(full[start + len(plain) :])

    # ----------------------------------------------------------------------------------------- ids <-> text
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``. Special-token strings in the text become their ids (as in HF)."""
        if self.hf is not None:
            return list(self.hf.encode(text, add_special_tokens=add_special_tokens))
        ids = self.tiktoken.encode(text, allowed_special="all")
        return ([self.bos_token_id] + ids) if add_special_tokens else ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        """Token ids of ``text`` (no added specials) and the character offset where each token starts."""
        if self.hf is not None:
            enc = self.hf(text, add_special_tokens=False, return_offsets_mapping=True)
            return list(enc["input_ids"]), [int(s) for s, _ in enc["offset_mapping"]]
        ids = self.tiktoken.encode(text, allowed_special="all")
        decoded, offsets = self.tiktoken.decode_with_offsets(ids)
        if decoded != text:
            raise ValueError("tiktoken offsets are only defined for text that round-trips")
        return ids, list(offsets)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        if self.hf is not None:
            return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)
        if skip_special_tokens:
            special = set(self.tiktoken._special_tokens.values())
            ids = [i for i in ids if i not in special]
        return self.tiktoken.decode(ids)

    def token_to_id(self, token: str | None) -> int | None:
        """Id of a single token string (special or regular), or None when it is not one token."""
        if token is None:
            return None
        if self.hf is not None:
            tid = self.hf.convert_tokens_to_ids(token)
            unk = getattr(self.hf, "unk_token_id", None)
            return None if tid is None or (tid == unk and token != self.hf.unk_token) else int(tid)
        special = self.tiktoken._special_tokens
        if token in special:
            return special[token]
        try:
            return self.tiktoken.encode_single_token(token.encode("utf-8"))
        except KeyError:
            return None

    @property
    def vocab_size(self) -> int:
        return len(self.hf) if self.hf is not None else self.tiktoken.n_vocab

    # ----------------------------------------------------------------------------------------------- misc
    def _resolve_pad(self, pad_token: str | None) -> tuple[str, int]:
        if pad_token is not None and self.token_to_id(pad_token) is not None:
            return pad_token, self.token_to_id(pad_token)
        policy = self.pad_policy
        if policy == "eos":
            return self.eos_token, self.eos_token_id
        if policy == "unk":
            if self.unk_token_id is None:
                raise ValueError(f"{self.path}: pad_policy='unk' but the tokenizer has no UNK token")
            return self.unk_token, self.unk_token_id
        if policy == "add":
            if self.hf is not None:
                self.hf.add_special_tokens({"pad_token": "<pad>"})
                return "<pad>", int(self.hf.pad_token_id)
            self.tiktoken = _tiktoken_encoding(
                self._meta["ranks_path"], self._meta["pattern"], [*self._meta["special_tokens"], "<pad>"]
            )
            self._meta["special_tokens"] = [*self._meta["special_tokens"], "<pad>"]
            return "<pad>", self.tiktoken._special_tokens["<pad>"]
        raise ValueError(
            f"{self.path}: the tokenizer has no pad token and pad_policy={policy!r}; "
            f"choose one of {PAD_POLICIES}"
        )

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The conversation as text through ``chat_template`` (see :mod:`jaxrlhf.data.templates`)."""
        from jaxrlhf.data.templates import render

        if self.chat_template is None:
            raise ValueError(f"{self.path}: the tokenizer has no chat template; pass chat_template=")
        return render(self.chat_template, messages, add_generation_prompt, self.bos_token, self.eos_token)

    def save_pretrained(self, out_dir: str) -> None:
        """Write files that :func:`load_tokenizer` reads back (chat template and pad token included)."""
        os.makedirs(out_dir, exist_ok=True)
        if self.hf is not None:
            self.hf.chat_template = self.chat_template
            if self.hf.pad_token is None:
                self.hf.pad_token = self.pad_token
            self.hf.save_pretrained(out_dir)
            return
        shutil.copyfile(self._meta["ranks_path"], os.path.join(out_dir, "tokenizer.tiktoken"))
        meta = {k: self._meta[k] for k in ("pattern", "special_tokens")}
        meta.update(
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            pad_token=self.pad_token,
            chat_template=self.chat_template,
        )
        with open(os.path.join(out_dir, _TIKTOKEN_META), "w") as f:
            json.dump(meta, f, indent=1)


def _tiktoken_encoding(ranks_path: str, pattern: str, special_tokens: Sequence[str]):
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(ranks_path)
    n = len(ranks)
    return tiktoken.Encoding(
        name=os.path.basename(ranks_path),
        pat_str=pattern,
        mergeable_ranks=ranks,
        special_tokens={tok: n + i for i, tok in enumerate(special_tokens)},
    )


def _is_sentencepiece(path: str) -> bool:
    try:
        import sentencepiece as spm

        spm.SentencePieceProcessor(model_file=path)
        return True
    except Exception:
        return False


_HF_JSON_FILES = ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json", "added_tokens.json")


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        size = os.path.getsize(path)
        raise TokenizerError(
            f"invalid JSON ({e}; {size} bytes): the file is truncated or corrupt", file=path
        ) from None
    if not isinstance(value, dict):
        raise TokenizerError(f"expected a JSON object, got {type(value).__name__}", file=path)
    return value


def _load_hf(path: str, trust_remote_code: bool):
    """``AutoTokenizer.from_pretrained`` offline, with trust_remote_code explicit (never a prompt) and errors
    that name the file."""
    from transformers import AutoTokenizer

    configs = {
        name: _read_json(os.path.join(path, name))
        for name in _HF_JSON_FILES
        if os.path.isfile(os.path.join(path, name))
    }
    auto_map = configs.get("tokenizer_config.json", {}).get("auto_map")
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as e:
        if auto_map and not trust_remote_code and "trust_remote_code" in str(e):
            raise TokenizerError(
                f"auto_map {auto_map} asks to run Python code from the tokenizer directory; jaxrlhf runs no "
                "code from model files unless told to: read that code, then set tokenizer.trust_remote_code="
                "true (load_tokenizer(..., trust_remote_code=True)), or use a directory with a built-in "
                "tokenizer_class",
                file=os.path.join(path, "tokenizer_config.json"),
            ) from None
        sp = os.path.join(path, "tokenizer.model")
        if "tokenizer.json" not in configs and os.path.isfile(sp) and not _is_sentencepiece(sp):
            raise TokenizerError(
                f"not a readable SentencePiece model ({os.path.getsize(sp)} bytes): truncated or corrupt",
                file=sp,
            ) from None
        raise TokenizerError(
            f"cannot load the tokenizer ({type(e).__name__}: {e}); files: {sorted(os.listdir(path))}",
            file=path,
        ) from None


def load_tokenizer(
    path: str,
    *,
    pad_policy: str = "eos",
    chat_template: str | None = None,
    tiktoken_pattern: str = LLAMA3_PATTERN,
    tiktoken_special_tokens: Sequence[str] = LLAMA3_SPECIAL_TOKENS,
    trust_remote_code: bool = False,
) -> Tokenizer:
    """Load a local tokenizer (see the module docstring for the layouts and the pad policy).

    ``trust_remote_code``: let transformers import the Python files that ``tokenizer_config.json``'s
    ``auto_map`` names (off: such a directory is refused with a :class:`TokenizerError`; never a prompt).

    ``chat_template``: a template name (``"llama-2"``, ``"llama-3"``, ``"chatml"``, ``"alpaca"``,
    ``"plain"``), a Jinja string, or a ``.jinja`` file; None keeps the tokenizer's own template
    (possibly none).
    """
    from jaxrlhf.data.templates import resolve_template

    if pad_policy not in PAD_POLICIES:
        raise ValueError(f"pad_policy must be one of {PAD_POLICIES}, got {pad_policy!r}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer path {path!r} does not exist")
    ranks_path, meta = None, {"pattern": tiktoken_pattern, "special_tokens": list(tiktoken_special_tokens)}
    if os.path.isfile(path):
        if _is_sentencepiece(path):
            raise ValueError(
                f"{path}: a bare SentencePiece file; pass its directory with a tokenizer_config.json naming "
                '{"tokenizer_class": "LlamaTokenizer"} (or "T5Tokenizer"), the layout of HF repos'
            )
        ranks_path = path
    elif os.path.exists(os.path.join(path, _TIKTOKEN_META)):
        ranks_path = os.path.join(path, "tokenizer.tiktoken")
        meta.update(_read_json(os.path.join(path, _TIKTOKEN_META)))
    elif not any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        for name in ("tokenizer.tiktoken", "tokenizer.model"):
            candidate = os.path.join(path, name)
            if os.path.exists(candidate) and not _is_sentencepiece(candidate):
                ranks_path = candidate
                break
        else:
            raise ValueError(f"{path}: no tokenizer.json, tokenizer_config.json or tiktoken ranks file found")

    if ranks_path is not None:
        try:
            encoding = _tiktoken_encoding(ranks_path, meta["pattern"], meta["special_tokens"])
        except Exception as e:
            raise TokenizerError(
                f"not a tiktoken BPE ranks file ({type(e).__name__}: {e})", file=ranks_path
            ) from None
        meta["ranks_path"] = ranks_path
        specials = meta["special_tokens"]
        tok = Tokenizer(
            path=path,
            encoding=encoding,
            bos_token=meta.get("bos_token", specials[0]),
            eos_token=meta.get("eos_token", specials[1]),
            pad_token=meta.get("pad_token"),
            unk_token=None,
            chat_template=meta.get("chat_template"),
            pad_policy=pad_policy,
            meta=meta,
        )
    else:
        hf = _load_hf(path, trust_remote_code)
        tok = Tokenizer(
            path=path,
            hf=hf,
            bos_token=hf.bos_token,
            eos_token=hf.eos_token,
            pad_token=hf.pad_token,
            unk_token=hf.unk_token,
            chat_template=hf.chat_template if isinstance(hf.chat_template, str) else None,
            pad_policy=pad_policy,
        )
    if chat_template is not None:
        tok.chat_template = resolve_template(chat_template)
    return tok
