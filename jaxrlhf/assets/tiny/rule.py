"""The ground-truth rule of the bundled tiny task (the reward model never sees this code).

Prompts are one of two small questions::

    What is 7 + 5?          (add: two integers in 0..9)
    Sort 8 3 5.             (sort: three or four digits)

Answers come in two styles::

    polite: "Sure! 7 + 5 = 12. Hope this helps!"     "Sure! Sorted: 3 5 8. Hope this helps!"
    terse:  "12"                                     "3 5 8"

and are right or wrong. :func:`check` scores a response as ``0.5 * correct + 0.5 * polite`` (so 0, 0.5 or 1):
human raters in ``prefs.jsonl`` preferred the higher-scoring answer (with some label noise), so a policy that
learns what they liked moves towards polite, correct answers and this score goes up.
"""

from __future__ import annotations

import re

POLITE_PREFIX = "Sure!"
POLITE_SUFFIX = "Hope this helps!"

_ADD_PROMPT = re.compile(r"What is (\d+) \+ (\d+)\?")
_SORT_PROMPT = re.compile(r"Sort ((?:\d )*\d)\.")
_ADD_ANSWER = re.compile(r"(?:(\d+) \+ (\d+) = )?(\d+)\.?")
_SORT_ANSWER = re.compile(r"(?:Sorted: )?((?:\d )*\d)\.?")


def parse_prompt(prompt: str) -> tuple[str, tuple[int, ...]]:
    """``("add", (a, b))`` or ``("sort", digits)``; ValueError for a prompt that is not of the task."""
    text = prompt.strip()
    m = _ADD_PROMPT.fullmatch(text)
    if m:
        return "add", (int(m.group(1)), int(m.group(2)))
    m = _SORT_PROMPT.fullmatch(text)
    if m:
        return "sort", tuple(int(d) for d in m.group(1).split())
    raise ValueError(f"not a tiny-task prompt: {prompt!r}")


def solve(prompt: str) -> str:
    """The right answer's core text (``"12"`` or ``"3 5 8"``)."""
    kind, args = parse_prompt(prompt)
    if kind == "add":
        return str(args[0] + args[1])
    return " ".join(str(d) for d in sorted(args))


def is_polite(response: str) -> bool:
    text = response.strip()
    return (
        text.startswith(POLITE_PREFIX)
        and text.endswith(POLITE_SUFFIX)
        and len(text) > len(POLITE_PREFIX) + len(POLITE_SUFFIX)
    )


def is_correct(prompt: str, response: str) -> bool:
    """Whether the answer inside the (polite or terse) response is right; anything unparsable is wrong."""
    kind, args = parse_prompt(prompt)
    core = response.strip()
    if is_polite(core):
        core = core[len(POLITE_PREFIX) : -len(POLITE_SUFFIX)].strip()
    if kind == "add":
        m = _ADD_ANSWER.fullmatch(core)
        if not m:
            return False
        if m.group(1) is not None and (int(m.group(1)), int(m.group(2))) != args:
            return False
        return int(m.group(3)) == args[0] + args[1]
    m = _SORT_ANSWER.fullmatch(core)
    return bool(m) and tuple(int(d) for d in m.group(1).split()) == tuple(sorted(args))


def check(prompt: str, response: str) -> float:
    """Ground-truth score in {0, 0.5, 1}: ``0.5 * correct + 0.5 * polite``."""
    return 0.5 * float(is_correct(prompt, response)) + 0.5 * float(is_polite(response))
