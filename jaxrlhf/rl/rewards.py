"""Rewards behind one interface: a reward model and/or Python functions, weighted.

    scores[r] = sum_k w_k * reward_k[r]     (terms that are NaN, i.e. a function returned None, are skipped)
    reward_0  = (RM(prompt ++ completion) - mean) / std      when ``path`` names an RM stage checkpoint
    reward_k  = f_k(prompts, completions, **columns)[r]      Python functions, in ``function`` order

then ``clip`` (to ``[-clip, clip]``) and the no-stop rule for completions that never reached a stop token
(``no_stop_penalty``: subtract it; ``no_stop_score``: replace the score by it). ``mean`` / ``std`` come from
the RM's ``reward_stats.json`` unless the rollout is given the PPO state's running normaliser.

Python functions have TRL's signature ``f(prompts: list[str], completions: list[str], **columns) ->
list[float]``: the prompt row's other source columns are passed by name (a reference ``answer`` ...), named
``package.module:function`` or ``path/to/file.py:function`` (or ``tiny``: the bundled task's rule). An entry
may be ``None`` ("not applicable to this row", as in TRL): that term is skipped for that row (TRL's nan-sum;
a row whose every term is None scores 0). Anything else that is not a finite number is an error naming the
function, the row and the value.

The reward model must read the policy's token ids: a different tokenizer is an error before anything is
compiled unless ``retokenize: true``, which decodes the policy's text and re-encodes prompt + completion with
the RM's tokenizer (its chat template for chat prompts), as the RM stage tokenised its training pairs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import json
import math
import numbers
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from jaxrlhf import data, generation, sharding
from jaxrlhf.data.packing import pad_right
from jaxrlhf.rl import prompts as prompts_lib

__all__ = [
    "TINY_RULE",
    "HostInputs",
    "RewardConfig",
    "Rewards",
    "build_rewards",
    "call_function",
    "load_function",
    "same_tokenizer",
    "tiny_rule",
]

TINY_RULE = "jaxrlhf.rl.rewards:tiny_rule"


def tiny_rule(prompts: list[str], completions: list[str], **columns: Any) -> list[float | None]:
    """The tiny task's ground-truth score (``jaxrlhf.assets.tiny.check``: 0, 0.5 or 1); None off-task."""
    from jaxrlhf.assets import tiny

    out: list[float | None] = []
    for p, c in zip(prompts, completions, strict=True):
        try:
            out.append(tiny.check(p, c))
        except ValueError:  # not a tiny-task prompt: not applicable
            out.append(None)
    return out


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """The ``reward:`` section of an RL stage config (see the module docstring).

    path: RM stage checkpoint (``runs/<rm>/stage``) or None. function: one spec or a tuple of them.
    weights: one per term (RM first, then functions); None = all 1. retokenize: re-encode the text for an
    RM with another tokenizer. clip: clip the weighted sum to [-clip, clip]. no_stop_penalty /
    no_stop_score: subtract from / replace the score of completions without a stop token (at most one).
    """

    path: str | None = None
    function: str | tuple[str, ...] | None = None
    weights: tuple[float, ...] | None = None
    retokenize: bool = False
    clip: float | None = None
    no_stop_penalty: float | None = None
    no_stop_score: float | None = None

    def __post_init__(self):
        fns = self.function
        if isinstance(fns, str):
            fns = (fns,)
        object.__setattr__(self, "function", tuple(fns) if fns else None)
        if self.weights is not None:
            object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
        if self.clip is not None and not self.clip > 0:
            raise ValueError(f"reward.clip must be > 0 (or null), got {self.clip}")
        if self.no_stop_penalty is not None and self.no_stop_score is not None:
            raise ValueError("reward.no_stop_penalty and reward.no_stop_score cannot both be set")

    @property
    def names(self) -> tuple[str, ...]:
        """Term names, in weight order: ``reward_model`` (when ``path``), then the function specs."""
        return (("reward_model",) if self.path else ()) + (self.function or ())

    def check(self, tokenizer: data.Tokenizer | None = None, *, scorer: bool = False) -> tuple[Callable, ...]:
        """Validate without touching any model: a reward exists, weights fit, every function imports and is
        callable, ``path`` is an RM stage, and (given the policy ``tokenizer``) the RM's tokenizer matches
        it unless ``retokenize``. ``scorer``: a reward model is given in code instead of ``path``. Returns the
        loaded functions."""
        if not self.path and not self.function and not scorer:
            raise ValueError("reward: set reward.path (a reward-model stage) and/or reward.function")
        names = self.names if not scorer else ("reward_model",) + (self.function or ())
        if self.weights is not None and len(self.weights) != len(names):
            raise ValueError(
                f"reward.weights has {len(self.weights)} entries for {len(names)} terms {list(names)}"
            )
        fns = tuple(load_function(spec) for spec in self.function or ())
        if self.path:
            rm_tok_dir = _check_rm_stage(self.path)
            if tokenizer is not None and not self.retokenize:
                check_tokenizers(tokenizer, data.load_tokenizer(rm_tok_dir), where=self.path)
        return fns


def _check_rm_stage(path: str) -> str:
    stage_file = os.path.join(path, "stage.json")
    if not os.path.isfile(stage_file):
        raise FileNotFoundError(f"reward.path {path}: not a stage checkpoint (no stage.json)")
    with open(stage_file) as f:
        stage = json.load(f).get("stage")
    if stage != "rm":
        raise ValueError(f"reward.path {path}: a {stage!r} stage checkpoint, not a reward model ('rm')")
    tok = os.path.join(path, "tokenizer")
    if not os.path.isdir(tok):
        raise FileNotFoundError(f"reward.path {path}: no tokenizer/ to check against the policy's")
    return tok


# ---------------------------------------------------------------------------------------------- functions


def load_function(spec: str) -> Callable:
    """``package.module:function`` / ``path/to/file.py:function`` / ``tiny`` -> the callable."""
    if spec == "tiny":
        spec = TINY_RULE
    if ":" not in spec:
        raise ValueError(
            f"reward function {spec!r}: expected 'package.module:function' or 'file.py:function'"
        )
    where, name = spec.rsplit(":", 1)
    try:
        if where.endswith(".py") or os.sep in where or "/" in where:
            path = os.path.abspath(where)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"no such file {path}")
            mod_name = "jaxrlhf_reward_" + hashlib.sha256(path.encode()).hexdigest()[:12]
            module = sys.modules.get(mod_name)
            if module is None:
                file_spec = importlib.util.spec_from_file_location(mod_name, path)
                module = importlib.util.module_from_spec(file_spec)
                file_spec.loader.exec_module(module)
                sys.modules[mod_name] = module
        else:
            module = importlib.import_module(where)
    except Exception as e:
        raise ImportError(
            f"reward function {spec!r}: cannot import {where!r}: {type(e).__name__}: {e}"
        ) from e
    if not hasattr(module, name):
        raise ImportError(f"reward function {spec!r}: {where!r} has no attribute {name!r}")
    fn = getattr(module, name)
    if not callable(fn):
        raise TypeError(f"reward function {spec!r} is not callable (a {type(fn).__name__})")
    return fn


def call_function(
    fn: Callable, name: str, prompts: list[str], completions: list[str], columns: dict[str, list]
) -> np.ndarray:
    """Call a TRL-style reward function, validate its output -> float32 ``[len(completions)]``, NaN = None."""
    out = fn(prompts, completions, **columns)
    if isinstance(out, np.ndarray):
        if out.ndim != 1:
            raise ValueError(f"reward function {name!r} returned an array of shape {out.shape}, expected 1-D")
        out = out.tolist()
    if not isinstance(out, (list, tuple)):
        raise TypeError(
            f"reward function {name!r} returned a {type(out).__name__}, expected a list of floats"
        )
    if len(out) != len(completions):
        raise ValueError(
            f"reward function {name!r} returned {len(out)} values for {len(completions)} completions"
        )
    values = np.empty(len(out), np.float32)
    for i, v in enumerate(out):
        if v is None:
            values[i] = np.nan
        elif not isinstance(v, numbers.Real):
            raise TypeError(
                f"reward function {name!r}: value {i} is {v!r} ({type(v).__name__}), not a number"
            )
        elif not math.isfinite(float(v)):
            raise ValueError(f"reward function {name!r}: value {i} is {v!r} (not finite; None skips a row)")
        else:
            values[i] = float(v)
    return values


# ---------------------------------------------------------------------------------------------- tokenizers

_PROBES = ("Hello world! 12 + 30 = 42.", "  spaces\tand\nnew lines", "émoji 🙂 日本")


def same_tokenizer(a: data.Tokenizer, b: data.Tokenizer) -> bool:
    """Whether two tokenizers map text to the same ids (vocabulary, special ids and probe encodings)."""
    if a.vocab_size != b.vocab_size:
        return False
    if (a.bos_token_id, a.eos_token_id, a.pad_token_id) != (b.bos_token_id, b.eos_token_id, b.pad_token_id):
        return False
    if (a.hf is None) != (b.hf is None):
        return False
    if a.hf is not None and a.hf.get_vocab() != b.hf.get_vocab():
        return False
    return all(a.encode(p) == b.encode(p) for p in _PROBES)


def check_tokenizers(policy: data.Tokenizer, rm: data.Tokenizer, *, where: str = "the reward model") -> None:
    if not same_tokenizer(policy, rm):
        raise ValueError(
            f"{where}: the reward model's tokenizer ({rm.path}, vocab {rm.vocab_size}) differs from the "
            f"policy's ({policy.path}, vocab {policy.vocab_size}); set reward.retokenize: true to decode the "
            "policy's text and re-encode it with the reward model's tokenizer"
        )


# ---------------------------------------------------------------------------------------------- Rewards


class HostInputs(NamedTuple):
    """What the host prepares for the scoring pass: Python terms ``[R, K_py]`` (or None) and re-tokenised
    RM inputs ``[R, T]`` (None: the RM reads prompt ++ completion on device)."""

    py_terms: Any
    rm_ids: Any
    rm_mask: Any


@dataclasses.dataclass(frozen=True, eq=False)
class Rewards:
    """Built rewards (see :func:`build_rewards`). ``scorer``: a :class:`jaxrlhf.rl.rollout.Scorer` or None;
    ``stats``: RM ``(mean, std)``; ``rm_tokenizer``: set when RM inputs are re-encoded on the host."""

    tokenizer: Any
    functions: tuple[tuple[str, Callable], ...] = ()
    scorer: Any = None
    stats: tuple[float, float] = (0.0, 1.0)
    rm_tokenizer: Any = None
    weights: tuple[float, ...] = ()
    clip: float | None = None
    no_stop_penalty: float | None = None
    no_stop_score: float | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return (("reward_model",) if self.scorer is not None else ()) + tuple(n for n, _ in self.functions)

    def host_inputs(self, gen, batch, n: int, *, encoder_decoder: bool, stop_ids=(), mesh=None) -> HostInputs:
        """Decode this process's rows, run the Python functions, re-encode RM inputs when needed."""
        host_rm = self.scorer is not None and (self.rm_tokenizer is not None or encoder_decoder)
        if not self.functions and not host_rm:
            return HostInputs(None, None, None)
        rows = prompts_lib.local_rows(gen.tokens)
        prompt_rows = list(prompts_lib.local_rows(batch.prompt_ids))
        src = [prompt_rows.index(r // n) for r in rows]  # local prompt of each local completion row
        tokens, valid = prompts_lib.host_array(gen.tokens)[rows], prompts_lib.host_array(gen.mask)[rows] > 0
        completions = [
            self.tokenizer.decode(t[v], skip_special_tokens=True) for t, v in zip(tokens, valid, strict=True)
        ]
        prompts = [batch.prompts[j] for j in src]
        py_terms = None
        if self.functions:
            columns = {k: [v[j] for j in src] for k, v in batch.columns.items()}
            terms = [call_function(fn, name, prompts, completions, columns) for name, fn in self.functions]
            py_terms = prompts_lib.to_global(np.stack(terms, axis=1), mesh)
        rm_ids = rm_mask = None
        if host_rm:
            stops = np.asarray(stop_ids or (-1,))
            ended = [bool(np.isin(t[v], stops).any()) for t, v in zip(tokens, valid, strict=True)]
            tok = self.rm_tokenizer or self.tokenizer
            seqs = [
                _rm_ids(tok, self.tokenizer, prompts[i], batch.messages[src[i]], completions[i], ended[i])
                for i in range(len(rows))
            ]
            width = generation.bucket_length(sharding.global_max(max(map(len, seqs))))
            rm_ids = prompts_lib.to_global(pad_right(seqs, width, tok.pad_token_id), mesh)
            rm_mask = prompts_lib.to_global(pad_right([[1] * len(s) for s in seqs], width), mesh)
        return HostInputs(py_terms, rm_ids, rm_mask)


def _rm_ids(rm_tok, policy_tok, prompt: str, messages, completion: str, ended: bool) -> list[int]:
    """RM input ids of one row, tokenised as the RM stage tokenised its pairs (data.formats)."""
    if messages is not None and rm_tok.chat_template is not None:
        ids, _ = data.tokenize_chat(rm_tok, messages + [{"role": "assistant", "content": completion}])
        return list(ids)
    if messages is not None:
        prompt = policy_tok.render_chat(messages, add_generation_prompt=True)
    ids = list(rm_tok.prefix_ids) + rm_tok.encode(prompt) + rm_tok.encode(completion)
    return ids + ([rm_tok.eos_token_id] if ended else [])


def build_rewards(
    config: RewardConfig,
    tokenizer: data.Tokenizer,
    *,
    mesh: Any = None,
    dtype: Any = None,
    scorer: Any = None,
    stats: Sequence[float] | None = None,
    rm_tokenizer: data.Tokenizer | None = None,
) -> Rewards:
    """Check ``config`` (before anything compiles), load the reward model of ``config.path``, return Rewards.

    Instead of ``path``, a ``scorer`` (e.g. a reward adapter + head on the shared policy base) may be given
    with its ``stats`` and, when its tokenizer differs from ``tokenizer``, ``rm_tokenizer`` (then
    ``config.retokenize`` must be set, as for ``path``).
    """
    if config.path and scorer is not None:
        raise ValueError("build_rewards: give reward.path or a scorer, not both")
    fns = config.check(tokenizer, scorer=scorer is not None)
    if config.path:
        from jaxrlhf import reward_model
        from jaxrlhf.rl.rollout import Scorer

        rm = reward_model.load(config.path, mesh=mesh, dtype=dtype)
        scorer = Scorer.from_reward_model(rm)
        stats = (float(rm.stats["mean"]), float(rm.stats["std"]))
        rm_tokenizer = data.load_tokenizer(rm.tokenizer_dir) if config.retokenize else None
    elif scorer is not None:
        if rm_tokenizer is not None and not config.retokenize:
            check_tokenizers(tokenizer, rm_tokenizer)
        rm_tokenizer = rm_tokenizer if config.retokenize else None
    if config.retokenize and rm_tokenizer is None:
        rm_tokenizer = tokenizer
    functions = tuple(zip(config.function or (), fns, strict=True))
    weights = config.weights or (1.0,) * ((scorer is not None) + len(functions))
    return Rewards(
        tokenizer=tokenizer,
        functions=functions,
        scorer=scorer,
        stats=tuple(stats) if stats is not None else (0.0, 1.0),
        rm_tokenizer=rm_tokenizer,
        weights=tuple(weights),
        clip=config.clip,
        no_stop_penalty=config.no_stop_penalty,
        no_stop_score=config.no_stop_score,
    )
