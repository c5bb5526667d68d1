"""``jaxrlhf generate``: sample from a stage checkpoint or a Hugging Face model directory.

  jaxrlhf generate --checkpoint runs/sft/final --prompt "What is 2+3?" --temperature 0
  jaxrlhf generate --checkpoint ./Llama-3.2-1B-Instruct --prompts-file prompts.jsonl --output out.jsonl
  jaxrlhf generate --checkpoint runs/ppo/final --interactive        # chat, tokens streamed as they come

Prompts come from ``--prompt`` (repeatable), ``--prompts-file`` (``.txt``: one prompt per line; ``.jsonl`` /
``.json``: rows with ``prompt`` (text or a message list) or ``messages``), or, in interactive mode, standard
input (a multi-turn conversation; an empty line or ``/reset`` starts a new one). The tokenizer's chat
template is applied when it has one (``--no-chat-template`` feeds raw text); a stage checkpoint's LoRA
adapters are used unmerged. Generation stops at the model's EOS, the tokenizer's EOS and the chat
template's end-of-turn token.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, TextIO

import jax
import numpy as np

from jaxrlhf import generation
from jaxrlhf.generation import SamplingConfig

_END_OF_TURN = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jaxrlhf generate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--checkpoint", required=True, help="stage checkpoint directory or HF model directory")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the checkpoint's own)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument(
        "--prompts-file", help=".txt (one prompt per line) or .jsonl/.json rows with prompt/messages"
    )
    p.add_argument("--interactive", action="store_true", help="chat on stdin, streaming tokens")
    p.add_argument("--system", help="system message prepended to every conversation")
    p.add_argument("--no-chat-template", action="store_true", help="tokenize prompts as raw text")
    p.add_argument("--chat-template", help="template name or Jinja file overriding the tokenizer's")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--min-new-tokens", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--n", type=int, default=1, help="samples per prompt")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", help="parameter dtype (e.g. bfloat16)")
    p.add_argument("--compute-dtype", help="activation dtype (default: the parameter dtype)")
    p.add_argument("--output", help="write JSONL rows {prompt, completion, tokens} here")
    p.add_argument("--chunk", type=int, default=8, help="tokens per streamed chunk (interactive mode)")
    return p


def load_model(path: str, dtype: Any) -> tuple[Any, Any, Any, Any, str]:
    """``(spec, params, lora, lora_config, tokenizer_dir)`` from a stage checkpoint or a HF directory."""
    from jaxrlhf import models
    from jaxrlhf.stages.common import is_stage_checkpoint

    if not os.path.isdir(path):
        raise SystemExit(f"jaxrlhf generate: --checkpoint {path} is not a directory")
    if is_stage_checkpoint(path):
        from jaxrlhf import train

        with open(os.path.join(path, "stage.json")) as f:
            if json.load(f).get("stage") == "rm":
                raise SystemExit(
                    f"jaxrlhf generate: {path} is a reward-model checkpoint (it scores text, it does not "
                    f"generate): score prompt/completion pairs with `jaxrlhf score --checkpoint {path} "
                    "--pairs pairs.jsonl`, or generate from the policy's checkpoint (e.g. the SFT stage)"
                )

        ckpt = train.load_stage(path, dtype=dtype)
        tok_dir = ckpt.tokenizer_dir if ckpt.tokenizer_dir is not None else os.path.join(path, "tokenizer")
        return ckpt.spec, ckpt.params, ckpt.lora, ckpt.lora_config, tok_dir
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise SystemExit(f"jaxrlhf generate: {path} is neither a stage checkpoint (stage.json) nor a HF dir")
    spec, params = models.load_pretrained(path, dtype=dtype)
    return spec, params, None, None, path


def read_prompts(path: str) -> list[Any]:
    """Prompts (text or message lists) from a ``.txt``, ``.jsonl`` or ``.json`` file; errors name the row."""
    if not os.path.isfile(path):
        raise SystemExit(f"jaxrlhf generate: --prompts-file {path} does not exist")
    with open(path, encoding="utf-8") as f:
        if not path.endswith((".jsonl", ".json")):
            return [line.rstrip("\n") for line in f if line.strip()]
        text = f.read()
    rows = json.loads(text) if path.endswith(".json") else None
    if rows is None:
        rows = []
        for i, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise SystemExit(f"jaxrlhf generate: {path} row {i}: invalid JSON ({e})") from None
    out = []
    for i, row in enumerate(rows):
        prompt = row.get("prompt", row.get("messages")) if isinstance(row, dict) else row
        if not isinstance(prompt, (str, list)) or not prompt:
            raise SystemExit(
                f"jaxrlhf generate: {path} row {i}: field 'prompt' (text or messages) is missing"
            )
        out.append(prompt)
    return out


class Generator:
    """Prompt text / conversations -> completions with one model, tokenizer and sampling config."""

    def __init__(self, args: argparse.Namespace):
        import jax.numpy as jnp

        from jaxrlhf import data

        self.args = args
        dtype = jnp.dtype(args.dtype)
        self.spec, self.params, self.lora, self.lora_config, tok_dir = load_model(args.checkpoint, dtype)
        self.tok = data.load_tokenizer(args.tokenizer or tok_dir, chat_template=args.chat_template)
        self.compute_dtype = jnp.dtype(args.compute_dtype) if args.compute_dtype else None
        self.use_chat = self.tok.chat_template is not None and not args.no_chat_template
        stops = set(self.spec.eos_token_ids) | {self.tok.eos_token_id}
        stops |= {i for i in map(self.tok.token_to_id, _END_OF_TURN) if i is not None}
        self.cfg = SamplingConfig(
            max_new_tokens=args.max_new_tokens,
            min_new_tokens=args.min_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            min_p=args.min_p,
            n=args.n,
            stop_token_ids=tuple(sorted(stops)),
            pad_token_id=self.tok.pad_token_id,
        )
        self.rng = jax.random.key(args.seed)
        self.calls = 0

    def encode(self, prompt: Any) -> list[int]:
        from jaxrlhf.data.templates import tokenize_chat_prompt

        if isinstance(prompt, list) or self.use_chat:
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            if self.args.system and messages[0].get("role") != "system":
                messages = [{"role": "system", "content": self.args.system}, *messages]
            return tokenize_chat_prompt(self.tok, messages)
        return self.tok.encode(prompt, add_special_tokens=True)

    def _batch(self, prompts: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
        ids = [self.encode(p) for p in prompts]
        width = max(len(x) for x in ids)
        out = np.full((len(ids), width), self.tok.pad_token_id, np.int32)
        mask = np.zeros((len(ids), width), np.int32)
        for b, x in enumerate(ids):  # left padding
            out[b, width - len(x) :], mask[b, width - len(x) :] = x, 1
        return out, mask

    def _kw(self) -> dict:
        self.calls += 1
        return dict(lora=self.lora, lora_config=self.lora_config, compute_dtype=self.compute_dtype)

    def complete(self, prompts: Sequence[Any]) -> list[list[tuple[str, list[int]]]]:
        """For each prompt, ``n`` ``(completion text, token ids)`` pairs."""
        ids, mask = self._batch(prompts)
        res = generation.generate(
            self.spec,
            self.params,
            ids,
            mask,
            jax.random.fold_in(self.rng, self.calls),
            self.cfg,
            **self._kw(),
        )
        tokens, valid = np.asarray(res.tokens), np.asarray(res.mask)
        out = []
        for b in range(len(prompts)):
            rows = range(b * self.cfg.n, (b + 1) * self.cfg.n)
            out.append([self._text(tokens[r][valid[r]]) for r in rows])
        return out

    def _text(self, ids: np.ndarray) -> tuple[str, list[int]]:
        ids = [int(i) for i in ids]
        return self.tok.decode(ids, skip_special_tokens=True), ids

    def stream(self, prompt: Any, out: TextIO) -> tuple[str, list[int]]:
        """Generate for one prompt (first sample), writing text to ``out`` as tokens arrive."""
        ids, mask = self._batch([prompt])
        cfg = dataclasses.replace(self.cfg, n=1)
        chunks = generation.stream(
            self.spec, self.params, ids, mask, jax.random.fold_in(self.rng, self.calls), cfg,
            chunk=self.args.chunk, **self._kw(),
        )  # fmt: skip
        got: list[int] = []
        shown = ""
        for tokens, valid in chunks:
            got += [int(t) for t in tokens[0][valid[0]]]
            text = self.tok.decode(got, skip_special_tokens=True)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                out.write(text[len(shown) :])
                out.flush()
                shown = text
        text = self.tok.decode(got, skip_special_tokens=True)
        out.write(text[len(shown) :] + "\n")
        out.flush()
        return text, got


def interactive(gen: Generator, stdin: TextIO, stdout: TextIO) -> None:
    """A multi-turn chat on ``stdin``; each reply is streamed to ``stdout``."""
    history: list[dict] = []
    stdout.write("jaxrlhf generate: type a message (empty line or /reset: new conversation, /quit: exit)\n")
    while True:
        stdout.write("> ")
        stdout.flush()
        line = stdin.readline()
        if not line or line.strip() == "/quit":
            return
        if not line.strip() or line.strip() == "/reset":
            history = []
            continue
        history.append({"role": "user", "content": line.rstrip("\n")})
        reply, _ = gen.stream(history if gen.use_chat else line.rstrip("\n"), stdout)
        history.append({"role": "assistant", "content": reply})
        if not gen.use_chat:
            history = []


def run_generate(
    argv: Sequence[str] | argparse.Namespace, stdin: TextIO = None, stdout: TextIO = None
) -> int:
    """Entry point of ``jaxrlhf generate`` (``argv``: its arguments, or a parsed Namespace). Returns 0."""
    args = argv if isinstance(argv, argparse.Namespace) else build_parser().parse_args(list(argv))
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    prompts: list[Any] = list(args.prompt)
    if args.prompts_file:
        prompts += read_prompts(args.prompts_file)
    if not prompts and not args.interactive:
        if not stdin.isatty():
            prompts = [line.rstrip("\n") for line in stdin if line.strip()]
        else:
            args.interactive = True
    gen = Generator(args)
    if args.interactive:
        interactive(gen, stdin, stdout)
        return 0
    sink = open(args.output, "w", encoding="utf-8") if args.output else None
    try:
        for start in range(0, len(prompts), args.batch_size):
            batch = prompts[start : start + args.batch_size]
            for prompt, samples in zip(batch, gen.complete(batch), strict=True):
                for text, ids in samples:
                    if sink is not None:
                        sink.write(json.dumps({"prompt": prompt, "completion": text, "tokens": ids}) + "\n")
                    shown = prompt if isinstance(prompt, str) else json.dumps(prompt)
                    stdout.write(f">>> {shown}\n{text}\n")
    finally:
        if sink is not None:
            sink.close()
    return 0
