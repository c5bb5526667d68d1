"""Chat templates and assistant-only loss masks that are right without ``{% generation %}`` markers.

Named fallbacks (``TEMPLATES``): ``llama-2`` (``[INST]``), ``llama-3`` (header tokens), ``chatml``,
``alpaca``, ``plain``. A tokenizer's own template wins unless the config names another one.

How the mask is computed (:func:`tokenize_chat`). Let ``R(m, g)`` be the rendered text of messages ``m`` with
``add_generation_prompt=g`` and ``ids = tok(R(all))``. For assistant message ``i``:

- the turn starts after ``R(msgs[:i], True)`` (the prompt the model sees at generation time), and
- it ends after the stop string that closes it (``<|eot_id|>``, ``<|im_end|>``, the EOS token ...) inside
  ``R(msgs[:i+1], False)``; text the template writes after the stop string (a newline) is not generated
  by the model and stays unmasked. Without a stop string the turn ends where ``R(msgs[:i+1])`` ends.

Each boundary ``b`` (a character position) becomes a token position by tokenizing the prefix text
``R(all)[:b]`` and checking that its ids are a prefix of ``ids`` (so the mask covers exactly the tokens of
the assistant text in the real tokenization). When a tokenizer merges characters across a boundary (a
prompt ending in ``"Assistant: "`` before an answer whose first token is ``" the"``), the boundary falls back
to the character offsets of ``ids`` and a token that straddles it counts as assistant (it holds assistant
text; this is also what ``{% generation %}`` masks do). A template that is not prefix-stable (it rewrites
earlier turns when later ones arrive) raises :class:`TemplateError`.
"""

from __future__ import annotations

import bisect
import os
from typing import Any

from jaxrlhf.data.errors import TemplateError

LLAMA2 = (
    "{% if messages and messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)
LLAMA3 = (
    "{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
ALPACA = (
    "{% if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\\n\\n' }}"
    "{% set loop_messages = messages[1:] %}{% else %}{{ 'Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\\n\\n' }}{% set loop_messages = messages %}"
    "{% endif %}{% for message in loop_messages %}{% if message['role'] == 'user' %}"
    "{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}{% elif message['role'] == 'assistant' %}"
    "{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
)
PLAIN = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'User:\\n' + message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ 'Assistant:\\n' + message['content'] + eos_token + '\\n\\n' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:\\n' }}{% endif %}"
)
TEMPLATES = {"llama-2": LLAMA2, "llama-3": LLAMA3, "chatml": CHATML, "alpaca": ALPACA, "plain": PLAIN}

# strings that close an assistant turn (besides the tokenizer's EOS token)
END_OF_TURN = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>")


def resolve_template(template: str) -> str:
    """A named fallback, a path to a ``.jinja`` file, or a Jinja string -> the Jinja string."""
    if template in TEMPLATES:
        return TEMPLATES[template]
    if template.endswith(".jinja") and os.path.isfile(template):
        with open(template) as f:
            return f.read()
    if "{%" in template or "{{" in template:
        return template
    raise ValueError(
        f"unknown chat template {template!r}: use one of {sorted(TEMPLATES)}, a .jinja file or Jinja"
    )


def render(template: str, messages: list[dict], add_generation_prompt: bool, bos_token, eos_token) -> str:
    """Render with transformers' sandboxed Jinja environment (the one ``apply_chat_template`` uses)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(
        conversations=[messages],
        chat_template=template,
        add_generation_prompt=add_generation_prompt,
        bos_token=bos_token or "",
        eos_token=eos_token or "",
    )
    return rendered[0]


def _stop_strings(tokenizer) -> tuple[str, ...]:
    # end-of-turn strings end a turn even when they are plain text for this tokenizer (a template's literal)
    return END_OF_TURN + ((tokenizer.eos_token,) if tokenizer.eos_token else ())


def _turn_end(text: str, start: int, end: int, stops: tuple[str, ...]) -> int:
    """End of an assistant turn in ``text[start:end]``: after its stop strings if only whitespace follows."""
    best = None
    for stop in stops:
        k = text.rfind(stop, start, end)
        if k >= 0 and not text[k + len(stop) : end].strip():
            best = max(best or 0, k + len(stop))
    return end if best is None else best


def _check_messages(messages: Any) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise TemplateError("messages must be a non-empty list of {'role', 'content'} dicts")
    for i, m in enumerate(messages):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise TemplateError(f"message {i} must be a dict with string 'role' and 'content', got {m!r}")
    return messages


def tokenize_chat(
    tokenizer, messages: list[dict], *, last_turn_only: bool = False
) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and its assistant mask (1 on assistant tokens, incl. their stop token).

    ``last_turn_only``: mask only the final assistant message (preference data). The family's BOS
    (``tokenizer.prefix_ids``) is prepended when the template does not write it.
    Raises :class:`TemplateError` (no row/file; the caller adds them) when no assistant token remains or the
    template is not prefix-stable.
    """
    messages = _check_messages(messages)
    full = tokenizer.render_chat(messages)
    ids = tokenizer.encode(full)
    stops = _stop_strings(tokenizer)
    spans = []
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if last_turn_only:
        turns = turns[-1:]
    for i in turns:
        prompt = tokenizer.render_chat(messages[:i], add_generation_prompt=True) if i else ""
        upto = tokenizer.render_chat(messages[: i + 1])
        if not full.startswith(upto) or not upto.startswith(prompt):
            raise TemplateError(
                f"chat template is not prefix-stable at message {i}: rendering the first {i} messages "
                "is not a prefix of rendering the whole conversation, so assistant tokens cannot be located"
            )
        start = len(prompt)
        spans.append((start, _turn_end(upto, start, len(upto), stops)))
    if not spans or all(s == e for s, e in spans):
        raise TemplateError("conversation has no assistant message to train on")
    mask = [0] * len(ids)
    offsets = None
    for s, e in spans:
        bounds = []
        for b, is_start in ((s, True), (e, False)):
            prefix_ids = tokenizer.encode(full[:b])
            if ids[: len(prefix_ids)] == prefix_ids:
                bounds.append(len(prefix_ids))
                continue
            # a token straddles the boundary: it belongs to the turn (it holds assistant text)
            if offsets is None:
                offsets = tokenizer.encode_with_offsets(full)[1]
            k = bisect.bisect_left(offsets, b)
            if is_start and k > 0 and (k == len(offsets) or offsets[k] > b) and offsets[k - 1] < b:
                k -= 1
            bounds.append(k)
        for k in range(bounds[0], bounds[1]):
            mask[k] = 1
    prefix = list(tokenizer.prefix_ids)
    if prefix and ids[: len(prefix)] != prefix:
        ids, mask = prefix + ids, [0] * len(prefix) + mask
    return ids, mask


def tokenize_chat_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Prompt ids for generation: the conversation (without a trailing assistant turn) + generation prompt."""
    messages = _check_messages(messages)
    if messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    ids = tokenizer.encode(tokenizer.render_chat(messages, add_generation_prompt=True))
    prefix = list(tokenizer.prefix_ids)
    if prefix and ids[: len(prefix)] != prefix:
        ids = prefix + ids
    return ids
