"""Row formats -> tokenized examples, and the batch dicts that the stages consume.

Formats (detected from the columns by :func:`detect_format`, or named in ``DataConfig.format``):

============================  ========================================================================
``text``                      ``text`` (continued pre-training: every token after the first is a target);
                              the column is ``DataConfig.text_field`` (RefinedWeb: ``content``)
``prompt_completion``         ``prompt`` + ``completion`` strings (loss on the completion and its EOS); or
                              TRL's conversational form, either one a message list (a string prompt is a
                              user message, a string completion the assistant's): through the chat
                              template, loss on the final assistant turn only (as preference responses)
``messages``                  ``messages`` (or FastChat / ShareGPT ``conversations``: ``from`` / ``value``
                              turns, ``human`` -> user, ``gpt`` -> assistant, ``system`` -> system; any
                              other role is a bad row): chat through a template, loss on the assistant
                              tokens (:func:`jaxrlhf.data.templates.tokenize_chat`)
``alpaca``                    ``instruction`` + optional ``input`` + ``output`` (alpaca / alpaca-lora rows;
                              see :func:`alpaca_prompt`): loss on the output and its EOS
``preference``                ``chosen`` + ``rejected`` (strings with a ``prompt`` string, or message lists
                              with a ``prompt`` message list or string), optional ``margin``; or an
                              implicit prompt: whole conversations sharing their leading messages
                              (UltraFeedback), HH-RLHF texts sharing all up to the last ``\\n\\nAssistant:``
                              (see :func:`split_preference`)
``prompt``                    ``prompt`` only (a string or messages), for PPO / GRPO generation
``seq2seq``                   ``inputs`` + ``targets`` for encoder-decoder models (T5, UL2)
============================  ========================================================================

Batches (numpy, from :class:`jaxrlhf.data.Loader`; ``B`` rows, ``T`` = padded length, int32 unless noted):

- SFT: ``input_ids``, ``attention_mask`` (1 = real token), ``loss_mask``, ``positions``, ``segment_ids``
  ``[B, T]``, right-padded. ``loss_mask[b, t] = 1`` means token ``t`` is a target predicted from the logits at
  ``t - 1``: ``loss = -sum_t loss_mask[:, t] * log p(input_ids[:, t] | ids[:, :t]) / sum(loss_mask)``. The
  first token of every example (segment) has ``loss_mask = 0``. ``segment_ids``: 1..k for the k examples
  packed in a row, 0 on padding; ``positions`` restart at 0 in every segment (unpacked rows: one segment).
- Preference: ``chosen_input_ids``, ``chosen_attention_mask``, ``chosen_loss_mask`` and the same three
  ``rejected_*`` ``[B, T]`` (same T for both), ``margin`` float32 ``[B]`` (0 when absent). Loss masks cover
  the final response only, with the convention above.
- Prompt: ``prompt_ids``, ``prompt_mask`` ``[B, P]`` left-padded (generation appends on the right; the
  forward pass derives positions from the mask), ``index`` ``[B]`` (row of the source dataset, to find
  references for reward functions). ``P`` is the smallest length bucket that fits (see ``packing``).
- Seq2seq: ``input_ids``, ``attention_mask`` ``[B, S]``; ``decoder_input_ids``, ``decoder_attention_mask``,
  ``labels``, ``loss_mask`` ``[B, T]``: ``decoder_input_ids = [start] + labels[:-1]`` and the logits at ``t``
  predict ``labels[:, t]`` (no shift), weighted by ``loss_mask``.

Truncation (``DataConfig.truncation``): ``"left"`` keeps the completion (the last assistant turn, the
response) whole and cuts the prompt from the left (after the BOS); a row whose completion alone does not fit
is a bad row. ``"drop"`` skips (and counts) every row that does not fit. ``"error"`` makes it a bad row.
Prompts are first cut to ``max_prompt_length``. Text rows under ``"left"`` keep their first ``max_length``
tokens. A preference pair's two rows lose the same prompt tokens (as many as its longer row must): both
responses follow one prompt, as TRL truncates the shared prompt rather than each side.
"""

from __future__ import annotations

from typing import Any

from jaxrlhf.data.templates import TemplateError, tokenize_chat, tokenize_chat_prompt

FORMATS = ("text", "prompt_completion", "messages", "alpaca", "preference", "prompt", "seq2seq")
KINDS = ("sft", "preference", "prompt", "seq2seq")
TRUNCATIONS = ("left", "drop", "error")
# formats each kind of dataset accepts (the prompt kind reads the prompt of any prompt-bearing format)
KIND_FORMATS = {
    "sft": ("text", "prompt_completion", "messages", "alpaca"),
    "preference": ("preference",),
    "prompt": ("prompt", "prompt_completion", "messages", "alpaca", "preference"),
    "seq2seq": ("seq2seq", "prompt_completion"),
}
REQUIRED_COLUMNS = {
    "text": ("text",),
    "prompt_completion": ("prompt", "completion"),
    "messages": ("messages",),
    "alpaca": ("instruction", "output"),
    "preference": ("chosen", "rejected"),
    "prompt": ("prompt",),
    "seq2seq": ("inputs", "targets"),
}
_SHAREGPT_ROLES = {
    "human": "user",
    "gpt": "assistant",
    "system": "system",
    "user": "user",
    "assistant": "assistant",
}
# alpaca-lora's templates/alpaca.json (tloen/alpaca-lora): the prompt of a row without / with an input
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
    "### Input:\n{input}\n\n### Response:\n"
)


class RowError(Exception):
    """A bad row (the caller adds file and row). ``drop``: skipped under every ``on_bad_row`` (truncation)."""

    def __init__(self, reason: str, field: str | None = None, drop: bool = False):
        super().__init__(reason)
        self.reason, self.field, self.drop = reason, field, drop


def detect_format(columns: list[str], *, text_field: str = "text") -> str | None:
    """The format implied by the column names, or None (``text_field``: the column of plain text)."""
    cols = set(columns)
    if {"chosen", "rejected"} <= cols:
        return "preference"
    if "messages" in cols or "conversations" in cols:
        return "messages"
    if {"inputs", "targets"} <= cols:
        return "seq2seq"
    if {"prompt", "completion"} <= cols:
        return "prompt_completion"
    if "instruction" in cols:
        return "alpaca"
    if "prompt" in cols:
        return "prompt"
    if text_field in cols:
        return "text"
    return None


def required_columns(fmt: str, kind: str, columns: list[str], *, text_field: str = "text") -> tuple[str, ...]:
    """The columns a file of ``fmt`` must have to feed a dataset of ``kind``."""
    if fmt == "messages" and "conversations" in columns:
        return ("conversations",)
    if fmt == "text":
        return (text_field,)
    if fmt == "alpaca" and kind == "prompt":
        return ("instruction",)
    return REQUIRED_COLUMNS[fmt]


# ---------------------------------------------------------------------------------------------- fields
def _text(row: dict, field: str, allow_empty: bool = False) -> str:
    value = row.get(field)
    if value is None:
        raise RowError("missing value", field)
    if not isinstance(value, str):
        raise RowError(f"expected a string, got {type(value).__name__}", field)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RowError(f"invalid UTF-8 text ({e.reason} at character {e.start})", field) from None
    if not allow_empty and not value.strip():
        raise RowError("is empty", field)
    return value


def _messages(row: dict, field: str) -> list[dict]:
    value = row.get(field)
    if value is None:
        raise RowError("missing value", field)
    if not isinstance(value, list) or not value:
        raise RowError(f"expected a non-empty list of messages, got {type(value).__name__}", field)
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise RowError(f"message {i} is a {type(m).__name__}, expected a dict", field)
        role, content = m.get("role", m.get("from")), m.get("content", m.get("value"))
        if role not in _SHAREGPT_ROLES:
            key = "from" if "from" in m and "role" not in m else "role"
            raise RowError(
                f"message {i} has unknown role {role!r} in {key!r} (known: user, assistant, system; "
                "ShareGPT's human, gpt)",
                field,
            )
        if not isinstance(content, str):
            raise RowError(f"message {i} content must be a string, got {type(content).__name__}", field)
        try:
            content.encode("utf-8")
        except UnicodeEncodeError as e:
            raise RowError(f"message {i}: invalid UTF-8 text ({e.reason})", field) from None
        out.append({"role": _SHAREGPT_ROLES[role], "content": content})
    return out


def _chat(tokenizer, messages: list[dict], field: str, last_turn_only: bool = False):
    if messages[-1]["role"] == "assistant" and not messages[-1]["content"].strip():
        raise RowError("the final assistant message is empty", field)
    try:
        return tokenize_chat(tokenizer, messages, last_turn_only=last_turn_only)
    except TemplateError as e:
        raise RowError(e.reason, field) from None
    except Exception as e:  # jinja raise_exception(...) and friends
        raise RowError(f"chat template failed: {e}", field) from None


# ------------------------------------------------------------------------------------------ truncation
def _fit(ids: list[int], mask: list[int], keep: int, opts: dict, field: str) -> tuple[list[int], list[int]]:
    """Cut ``ids`` from the left after ``keep`` tokens to fit ``max_length``; keep the last masked run."""
    return _cut(ids, mask, keep, len(ids) - opts["max_length"], opts, field)


def _cut(
    ids: list[int], mask: list[int], keep: int, over: int, opts: dict, field: str
) -> tuple[list[int], list[int]]:
    """Drop the ``over`` tokens after the first ``keep`` (none if ``over <= 0``) under ``truncation="left"``;
    the last masked run (the completion) must survive whole."""
    if over <= 0:
        return ids, mask
    max_length = opts["max_length"]
    policy = opts["truncation"]
    msg = f"{len(ids)} tokens > max_length {max_length}"
    if policy != "left":
        raise RowError(msg, field, drop=policy == "drop")
    last = len(mask) - 1
    while last >= 0 and not mask[last]:
        last -= 1
    first = last
    while first > 0 and mask[first - 1]:
        first -= 1
    if keep + over > first:
        raise RowError(f"{msg} and the completion alone ({len(ids) - first} tokens) does not fit", field)
    return ids[:keep] + ids[keep + over :], mask[:keep] + mask[keep + over :]


def _fit_pair(
    sides: list[tuple[list[int], list[int]]], keep: int, opts: dict, fields: tuple[str, str]
) -> list[tuple[list[int], list[int]]]:
    """A preference pair's two rows (the same prompt, then each response) cut by the SAME number of prompt
    tokens, so both responses are judged after the same context (and the pair rows share the prompt):
    as many as the longer row must lose. Each side's response must still fit whole."""
    over = max(len(ids) for ids, _ in sides) - opts["max_length"]
    if over > 0 and opts["truncation"] != "left":  # "drop" / "error": the longer side's error
        longer = max(range(len(sides)), key=lambda i: len(sides[i][0]))
        _fit(*sides[longer], keep, opts, fields[longer])  # raises
    out: list = [None] * len(sides)
    for i in sorted(range(len(sides)), key=lambda i: -len(sides[i][0])):  # a too-long response is named first
        out[i] = _cut(*sides[i], keep, over, opts, fields[i])
    return out


def _cut_prompt(ids: list[int], opts: dict, field: str) -> list[int]:
    limit = opts.get("max_prompt_length")
    if limit is None or len(ids) <= limit:
        return ids
    if opts["truncation"] != "left":
        raise RowError(
            f"prompt has {len(ids)} tokens > max_prompt_length {limit}",
            field,
            drop=opts["truncation"] == "drop",
        )
    return ids[len(ids) - limit :]


def _pair(tokenizer, prompt: str, completion: str, opts: dict, field: str, prompt_field: str = "prompt"):
    """Decoder-only (ids, loss_mask): [BOS] prompt completion EOS, loss on completion and EOS; not yet fit
    to ``max_length`` (the caller's ``_fit`` / ``_fit_pair``); the prompt is cut to ``max_prompt_length``."""
    prefix = list(tokenizer.prefix_ids)
    p = _cut_prompt(tokenizer.encode(prompt), opts, prompt_field) if prompt else []
    c = tokenizer.encode(completion) + [tokenizer.eos_token_id]
    ids = prefix + p + c
    mask = [0] * (len(prefix) + len(p)) + [1] * len(c)
    return ids, mask


def _conversation_completion(tokenizer, row: dict, opts: dict) -> tuple[list[int], list[int]]:
    """A conversational prompt / completion row: prompt messages + completion messages through the chat
    template, the final assistant turn masked (the tokens a preference response of the same row gets)."""
    sides = []
    for field, role in (("prompt", "user"), ("completion", "assistant")):
        value = row.get(field)
        sides.append(
            _messages(row, field)
            if isinstance(value, list)
            else [{"role": role, "content": _text(row, field)}]
        )
    ids, mask = _chat(tokenizer, sides[0] + sides[1], "completion", last_turn_only=True)
    return _fit(ids, mask, len(tokenizer.prefix_ids), opts, "completion")


def _finish(ids: list[int], mask: list[int]) -> tuple[list[int], list[int]]:
    mask = list(mask)
    if mask:
        mask[0] = 0  # nothing predicts the first token
    if not any(mask):
        raise RowError("no token to train on after tokenization")
    return ids, mask


# ---------------------------------------------------------------------------------------------- alpaca
def _alpaca_fields(row: dict[str, Any]) -> tuple[str, str]:
    """``(instruction, input)`` of an alpaca row; a missing or null ``input`` is ``""``."""
    instruction = _text(row, "instruction")
    return instruction, _text(row, "input", allow_empty=True) if row.get("input") is not None else ""


def alpaca_user_text(row: dict[str, Any]) -> str:
    """The request of an alpaca row as one user message: ``instruction``, then ``"\\n\\n"`` + ``input`` when
    the input is not empty."""
    instruction, extra = _alpaca_fields(row)
    return f"{instruction}\n\n{extra}" if extra else instruction


def alpaca_prompt(row: dict[str, Any], tokenizer) -> str | list[dict]:
    """The prompt of an alpaca row (``instruction``, optional ``input``).

    With a chat template (the tokenizer's, or ``DataConfig.template``): one user message,
    :func:`alpaca_user_text` (what TRL users get by mapping alpaca rows to messages). Without one: the text
    alpaca-lora trains on, ``ALPACA_PROMPT`` / ``ALPACA_PROMPT_INPUT`` (the input section only when the
    input is not empty), ending in ``"### Response:\\n"``.
    """
    if tokenizer.chat_template is not None:
        return [{"role": "user", "content": alpaca_user_text(row)}]
    instruction, extra = _alpaca_fields(row)
    if extra:
        return ALPACA_PROMPT_INPUT.format(instruction=instruction, input=extra)
    return ALPACA_PROMPT.format(instruction=instruction)


# ------------------------------------------------------------------------------------------ preference
HH_ASSISTANT = "\n\nAssistant:"  # Anthropic HH-RLHF turn marker: the implicit prompt ends at the last one


def _common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _implicit_text_prompt(chosen: str, rejected: str) -> str:
    """HH-RLHF style: the longest common prefix of the two texts that ends at a ``"\\n\\nAssistant:"``."""
    shared = chosen[: _common_prefix(chosen, rejected)]
    end = shared.rfind(HH_ASSISTANT)
    if end < 0:
        raise RowError(
            f"no prompt column, and chosen and rejected share no prefix ending in {HH_ASSISTANT!r} "
            "(Anthropic HH style): add a prompt column",
            "prompt",
        )
    return shared[: end + len(HH_ASSISTANT)]


def split_preference(row: dict[str, Any]) -> tuple[str | list[dict] | None, tuple]:
    """``(prompt, (chosen, rejected))`` of a preference row: all strings (prompt possibly ``""``), or all
    message lists (the prompt the shared context, the responses ending in the assistant answer).

    Accepted rows: ``prompt`` + ``chosen`` / ``rejected`` as strings or message lists (TRL's explicit
    prompt; a string prompt becomes a user message when the responses are messages); implicit prompts:
    ``chosen`` / ``rejected`` as whole conversations sharing their leading messages (UltraFeedback: a
    ``prompt`` string may sit beside them and is then not used again), or as HH-RLHF texts sharing
    everything up to the last ``"\\n\\nAssistant:"``. Raises :class:`RowError` for identical or empty
    responses and pairs without a prompt.
    """
    prompt, raw = row.get("prompt"), (row.get("chosen"), row.get("rejected"))
    if raw[0] is not None and raw[0] == raw[1]:
        raise RowError("chosen and rejected are identical (nothing to compare)", "rejected")
    if not any(isinstance(x, list) for x in (prompt, *raw)):  # plain text
        if prompt is None:
            c, r = _text(row, "chosen"), _text(row, "rejected")
            prompt = _implicit_text_prompt(c, r)
            sides = (c[len(prompt) :], r[len(prompt) :])
            for side, text in zip(("chosen", "rejected"), sides, strict=True):
                if not text.strip():
                    raise RowError(f"the response after the shared prompt {HH_ASSISTANT!r} is empty", side)
            return prompt, sides
        return _text(row, "prompt", True), (_text(row, "chosen"), _text(row, "rejected"))
    sides = tuple(
        _messages(row, side)
        if isinstance(row.get(side), list)
        else [{"role": "assistant", "content": _text(row, side)}]
        for side in ("chosen", "rejected")
    )
    if isinstance(prompt, list):
        p = _messages(row, "prompt")
        if all(resp[: len(p)] == p and len(resp) > len(p) for resp in sides):  # whole conversations
            sides = tuple(resp[len(p) :] for resp in sides)
    elif any(resp[0]["role"] != "assistant" for resp in sides):  # conversations carrying their own prompt
        k = _common_prefix(*sides)
        if k == 0:
            raise RowError(
                "chosen and rejected conversations share no leading messages (no prompt)", "rejected"
            )
        for side, resp in zip(("chosen", "rejected"), sides, strict=True):
            if len(resp) != k + 1:
                raise RowError(
                    f"chosen and rejected must differ only in their final message; they share {k} leading "
                    f"message(s) and {side} has {len(resp) - k} after them",
                    side,
                )
        p, sides = sides[0][:k], (sides[0][k:], sides[1][k:])
    elif prompt is not None:
        p = [{"role": "user", "content": _text(row, "prompt")}]
    else:
        raise RowError("chosen/rejected assistant messages need a prompt column", "prompt")
    if sides[0] == sides[1]:
        raise RowError("chosen and rejected responses are identical (nothing to compare)", "rejected")
    return p, sides


# ------------------------------------------------------------------------------------------------- rows
def process_row(row: dict[str, Any], fmt: str, kind: str, tokenizer, opts: dict) -> dict[str, Any]:
    """One source row -> one tokenized example (lists of ints). Raises :class:`RowError` on a bad row.

    ``opts``: ``max_length``, ``max_prompt_length`` (or None), ``truncation``.
    """
    if kind == "sft":
        if fmt == "text":
            text_field = opts.get("text_field", "text")
            text = _text(row, text_field)
            ids = list(tokenizer.prefix_ids) + tokenizer.encode(text) + [tokenizer.eos_token_id]
            if len(ids) > opts["max_length"]:
                if opts["truncation"] != "left":
                    raise RowError(
                        f"{len(ids)} tokens > max_length {opts['max_length']}",
                        text_field,
                        drop=opts["truncation"] == "drop",
                    )
                ids = ids[: opts["max_length"]]
            ids, mask = _finish(ids, [1] * len(ids))
        elif fmt == "prompt_completion" and any(
            isinstance(row.get(k), list) for k in ("prompt", "completion")
        ):
            ids, mask = _finish(*_conversation_completion(tokenizer, row, opts))
        elif fmt == "prompt_completion":
            ids, mask = _pair(
                tokenizer, _text(row, "prompt", True), _text(row, "completion"), opts, "completion"
            )
            ids, mask = _finish(*_fit(ids, mask, len(tokenizer.prefix_ids), opts, "completion"))
        elif fmt == "alpaca":
            prompt, output = alpaca_prompt(row, tokenizer), _text(row, "output")
            if isinstance(prompt, list):
                ids, mask = _chat(tokenizer, [*prompt, {"role": "assistant", "content": output}], "output")
                ids, mask = _finish(*_fit(ids, mask, len(tokenizer.prefix_ids), opts, "output"))
            else:
                ids, mask = _pair(tokenizer, prompt, output, opts, "output", "instruction")
                ids, mask = _finish(*_fit(ids, mask, len(tokenizer.prefix_ids), opts, "output"))
        else:
            field = "messages" if "messages" in row else "conversations"
            ids, mask = _chat(tokenizer, _messages(row, field), field)
            ids, mask = _finish(*_fit(ids, mask, len(tokenizer.prefix_ids), opts, field))
        return {"input_ids": ids, "loss_mask": mask}
    if kind == "preference":
        prompt, sides = split_preference(row)
        out, rows = {}, []
        names = ("chosen", "rejected")
        for side, resp in zip(names, sides, strict=True):
            if isinstance(resp, list):
                rows.append(_chat(tokenizer, (prompt or []) + resp, side, last_turn_only=True))
            else:
                rows.append(_pair(tokenizer, prompt, resp, opts, side))
        for side, (ids, mask) in zip(
            names, _fit_pair(rows, len(tokenizer.prefix_ids), opts, names), strict=True
        ):
            out[f"{side}_input_ids"], out[f"{side}_loss_mask"] = _finish(ids, mask)
        margin = row.get("margin", 0.0)
        if margin is None:
            margin = 0.0
        if isinstance(margin, bool) or not isinstance(margin, (int, float)):
            raise RowError(f"expected a number, got {type(margin).__name__}", "margin")
        out["margin"] = float(margin)
        return out
    if kind == "prompt":
        if fmt == "messages":
            field = "messages" if "messages" in row else "conversations"
            value: Any = _messages(row, field)
        elif fmt == "preference":
            field = "prompt"
            value = split_preference(row)[0]
        elif fmt == "alpaca":
            field = "instruction"
            value = alpaca_prompt(row, tokenizer)
        else:
            field = "prompt"
            value = row.get("prompt")
            value = _messages(row, field) if isinstance(value, list) else _text(row, field)
        if isinstance(value, list):
            try:
                ids = tokenize_chat_prompt(tokenizer, value)
            except Exception as e:
                raise RowError(f"chat template failed: {e}", field) from None
        else:
            ids = list(tokenizer.prefix_ids) + tokenizer.encode(value)
        keep = len(tokenizer.prefix_ids)
        limit = opts.get("max_prompt_length") or opts["max_length"]
        if len(ids) > limit:
            if opts["truncation"] != "left":
                raise RowError(
                    f"prompt has {len(ids)} tokens > {limit}", field, drop=opts["truncation"] == "drop"
                )
            ids = ids[:keep] + ids[len(ids) - (limit - keep) :]
        return {"prompt_ids": ids}
    if kind == "seq2seq":
        src, tgt = ("inputs", "targets") if fmt == "seq2seq" else ("prompt", "completion")
        inputs = tokenizer.encode(_text(row, src)) + [tokenizer.eos_token_id]
        limit = opts.get("max_prompt_length") or opts["max_length"]
        if len(inputs) > limit:
            if opts["truncation"] != "left":
                raise RowError(f"{len(inputs)} tokens > {limit}", src, drop=opts["truncation"] == "drop")
            inputs = inputs[len(inputs) - limit :]
        labels = tokenizer.encode(_text(row, tgt)) + [tokenizer.eos_token_id]
        if len(labels) > opts["max_length"]:
            raise RowError(
                f"{len(labels)} target tokens > max_length {opts['max_length']}",
                tgt,
                drop=opts["truncation"] == "drop",
            )
        return {"input_ids": inputs, "labels": labels}
    raise ValueError(f"unknown dataset kind {kind!r}; one of {KINDS}")
