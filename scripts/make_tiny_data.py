"""Generate the bundled tiny task data under ``jaxrlhf/assets/tiny/`` (deterministic: same bytes every run).

    python scripts/make_tiny_data.py [--out jaxrlhf/assets/tiny] [--seed 0]

The task and its ground-truth rule are in ``jaxrlhf/assets/tiny/rule.py``: single-digit addition and
subtraction questions answered polite (``Sure! 7 + 5 = 12. Hope this helps!``) or terse (``7 + 5 = 12``),
right or wrong; ``rule.check`` scores ``0.5 * correct + 0.5 * polite``. Wrong answers are the writers' one
kind of mistake, a misread operator (``7 + 5 = 2``, ``9 - 4 = 13``): see :func:`wrong_core`.

Outputs (JSON lines, one object per line, keys sorted):

- ``sft.jsonl`` (2000): ``{"prompt", "completion"}`` demonstrations — half polite, half terse, 85% right, so
  supervised fine-tuning imitates a mixture of styles, like real demonstrations from many writers.
- ``prefs.jsonl`` (2000): ``{"prompt", "chosen", "rejected"}`` — two different-scoring answers to one prompt;
  the higher-scoring one is ``chosen`` except for 5% flipped pairs (annotator noise).
- ``prompts.jsonl`` (500): ``{"prompt"}`` for RL stages.
- ``corpus.txt``: every distinct prompt and answer line, to train the tiny SentencePiece tokenizer.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, os.pardir, "jaxrlhf", "assets", "tiny")

N_SFT, N_PREFS, N_PROMPTS = 2000, 2000, 500
P_POLITE, P_CORRECT, P_FLIP = 0.5, 0.85, 0.05


def _load_rule(out_dir: str):
    spec = importlib.util.spec_from_file_location("tiny_rule", os.path.join(out_dir, "rule.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_prompt(rng: random.Random) -> str:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    if rng.random() < 0.5:
        return f"What is {a} + {b}?"
    return f"What is {max(a, b)} - {min(a, b)}?"


def wrong_core(prompt: str, rule) -> str:
    """A writer's wrong answer: the operator misread, i.e. the other operation's result (``|a - b|`` for
    ``a + b``, ``a + b`` for ``a - b``); where that is right anyway (an operand is 0) the product ``a * b``,
    and for ``0 + 0`` / ``0 - 0`` the answer plus one.

    A mistake that the tiny reward model learns to spot from the 2000 comparisons (the result does not fit
    the operator). With off-by-one-or-two slips, which only an exact sum exposes, the 2-layer tiny RM stayed
    at chance on pairs that differ only in correctness, although the SFT model's log-probabilities tell the
    right answer from the wrong one."""
    kind, (a, b) = rule.parse_prompt(prompt)
    right = int(rule.solve(prompt))
    other = abs(a - b) if kind == "add" else a + b
    return str(next(v for v in (other, a * b, right + 1) if v != right))


def respond(prompt: str, polite: bool, correct: bool, rule) -> str:
    """Both styles restate the question (``7 + 5 = 12``); polite ones wrap it in pleasantries."""
    kind, (a, b) = rule.parse_prompt(prompt)
    core = rule.solve(prompt) if correct else wrong_core(prompt, rule)
    body = f"{a} {'+' if kind == 'add' else '-'} {b} = {core}"
    if not polite:
        return body
    return f"{rule.POLITE_PREFIX} {body}. {rule.POLITE_SUFFIX}"


def generate(out_dir: str, seed: int = 0) -> dict[str, int]:
    rule = _load_rule(out_dir)
    rng = random.Random(seed)
    sft = []
    for _ in range(N_SFT):
        prompt = make_prompt(rng)
        completion = respond(prompt, rng.random() < P_POLITE, rng.random() < P_CORRECT, rule)
        sft.append({"prompt": prompt, "completion": completion})

    prefs = []
    styles = [(p, c) for p in (True, False) for c in (True, False)]
    while len(prefs) < N_PREFS:
        prompt = make_prompt(rng)
        a, b = rng.sample(styles, 2)
        ra, rb = respond(prompt, *a, rule), respond(prompt, *b, rule)
        sa, sb = rule.check(prompt, ra), rule.check(prompt, rb)
        if sa == sb:
            continue  # only pairs that the rule can order
        chosen, rejected = (ra, rb) if sa > sb else (rb, ra)
        if rng.random() < P_FLIP:
            chosen, rejected = rejected, chosen
        prefs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})

    prompts = [{"prompt": make_prompt(rng)} for _ in range(N_PROMPTS)]

    lines: list[str] = []
    for row in sft + prefs + prompts:
        lines.extend(v for k, v in sorted(row.items()))
    corpus = sorted(set(lines))

    os.makedirs(out_dir, exist_ok=True)
    for name, rows in (("sft.jsonl", sft), ("prefs.jsonl", prefs), ("prompts.jsonl", prompts)):
        with open(os.path.join(out_dir, name), "w", encoding="utf-8", newline="\n") as f:
            f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in rows)
    with open(os.path.join(out_dir, "corpus.txt"), "w", encoding="utf-8", newline="\n") as f:
        f.writelines(line + "\n" for line in corpus)
    return {"sft": len(sft), "prefs": len(prefs), "prompts": len(prompts), "corpus": len(corpus)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=DEFAULT_OUT, help="output directory (must hold rule.py)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(json.dumps(generate(os.path.normpath(args.out), args.seed)))


if __name__ == "__main__":
    main()
