"""The ground-truth rule of the bundled tiny task (the reward model never sees this code).

Prompts are small arithmetic questions (a tiny model can learn the 155 facts in a few hundred steps)::

    What is 7 + 5?          (add: two integers in 0..9)
    What is 9 - 4?          (subtract: a >= b, both in 0..9)

Answers come in two styles (the bundled ones restate the question in both; a bare ``"12"`` counts as terse)::

    polite: "Sure! 7 + 5 = 12. Hope this helps!"
    terse:  "7 + 5 = 12"

and are right or wrong (the bundled wrong ones misread the operator: ``"7 + 5 = 2"``). :func:`check` scores
a response as ``0.5 * correct + 0.5 * polite`` (so 0, 0.5 or 1): human raters in ``prefs.jsonl`` preferred
the higher-scoring answer (with some label noise), so a policy that learns what they liked moves towards
polite, correct answers and this score goes up.
"""

from __future__ import annotations

import re

POLITE_PREFIX = "Sure!"
POLITE_SUFFIX = "Hope this helps!"

_PROMPT = re.compile(r"What is (\d+) ([+-]) (\d+)\?")
_ANSWER = re.compile(r"(?:(\d+) ([+-]) (\d+) = )?(\d+)\.?")
_OPS = {"+": ("add", lambda a, b: a + b), "-": ("subtract", lambda a, b: a - b)}


def parse_prompt(prompt: str) -> tuple[str, tuple[int, int]]:
    """``("add", (a, b))`` or ``("subtract", (a, b))``; ValueError for a prompt that is not of the task."""
    m = _PROMPT.fullmatch(prompt.strip())
    if not m:
        raise ValueError(f"not a tiny-task prompt: {prompt!r}")
    return _OPS[m.group(2)][0], (int(m.group(1)), int(m.group(3)))


def _symbol(kind: str) -> str:
    return "+" if kind == "add" else "-"


def solve(prompt: str) -> str:
    """The right answer's core text (``"12"``)."""
    kind, (a, b) = parse_prompt(prompt)
    return str(_OPS[_symbol(kind)][1](a, b))


def is_polite(response: str) -> bool:
    text = response.strip()
    return (
        text.startswith(POLITE_PREFIX)
        and text.endswith(POLITE_SUFFIX)
        and len(text) > len(POLITE_PREFIX) + len(POLITE_SUFFIX)
    )


def is_correct(prompt: str, response: str) -> bool:
    """Whether the answer inside the (polite or terse) response is right; anything unparsable is wrong.

    A restated question (``7 + 5 = 12``) must restate the prompt's own operands and operator.
    """
    kind, (a, b) = parse_prompt(prompt)
    core = response.strip()
    if is_polite(core):
        core = core[len(POLITE_PREFIX) : -len(POLITE_SUFFIX)].strip()
    m = _ANSWER.fullmatch(core)
    if not m:
        return False
    if m.group(1) is not None and (int(m.group(1)), m.group(2), int(m.group(3))) != (a, _symbol(kind), b):
        return False
    return m.group(4) == solve(prompt)


def check(prompt: str, response: str) -> float:
    """Ground-truth score in {0, 0.5, 1}: ``0.5 * correct + 0.5 * polite``."""
    return 0.5 * float(is_correct(prompt, response)) + 0.5 * float(is_polite(response))
