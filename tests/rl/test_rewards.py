"""rl.rewards: Python reward functions (loading, columns, validation, weights, None), the tiny rule, the
reward model (normalised scores, tokenizer mismatch, re-tokenisation), the config contract."""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import textwrap

import jax
import numpy as np
import pytest

from jaxrlhf import data, generation, reward_model, train
from jaxrlhf.generation import SamplingConfig
from jaxrlhf.rl import prompts as pl
from jaxrlhf.rl import rewards as rw
from tests.rl import _tiny

rl = importlib.import_module("jaxrlhf.rl.rollout")  # the module (the package exports the function)

FUNCS = textwrap.dedent(
    """
    import math
    def length(prompts, completions, **columns):
        return [float(len(c)) for c in completions]
    def answer_given(prompts, completions, answer, **columns):
        return [1.0 if int(a) % 2 else None for a in answer]
    def wrong_length(prompts, completions, **columns):
        return [0.0]
    def not_a_number(prompts, completions, **columns):
        return [1.0] + ["high"] * (len(completions) - 1)
    def nan(prompts, completions, **columns):
        return [0.0, math.nan] + [0.0] * (len(completions) - 2)
    def inf(prompts, completions, **columns):
        return [math.inf] * len(completions)
    def as_dict(prompts, completions, **columns):
        return {"r": 1.0}
    def as_array(prompts, completions, **columns):
        import numpy as np
        return np.arange(len(completions), dtype=np.float32)
    not_callable = 3
    """
)
PROMPTS = [{"prompt": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(4)]


@pytest.fixture(scope="module")
def funcs(tmp_path_factory):
    root = tmp_path_factory.mktemp("funcs")
    (root / "my_rewards.py").write_text(FUNCS)
    (root / "broken.py").write_text("raise RuntimeError('boom at import')\n")
    return root


def test_load_function_specs_and_errors(funcs, monkeypatch):
    monkeypatch.syspath_prepend(str(funcs))
    by_file = rw.load_function(f"{funcs}/my_rewards.py:length")
    by_module = rw.load_function("my_rewards:length")
    assert by_file(["p"], ["abc"]) == by_module(["p"], ["abc"]) == [3.0]
    assert rw.load_function("tiny") is rw.tiny_rule is rw.load_function(rw.TINY_RULE)
    with pytest.raises(ImportError, match=r"'no_such_module:f'.*cannot import 'no_such_module'"):
        rw.load_function("no_such_module:f")
    with pytest.raises(ImportError, match=r"broken.py:f'.*RuntimeError: boom at import"):
        rw.load_function(f"{funcs}/broken.py:f")
    with pytest.raises(ImportError, match=r"no such file .*missing.py"):
        rw.load_function(f"{funcs}/missing.py:f")
    with pytest.raises(ImportError, match=r"'my_rewards:nope'.*has no attribute 'nope'"):
        rw.load_function("my_rewards:nope")
    with pytest.raises(TypeError, match=r"'my_rewards:not_callable' is not callable \(a int\)"):
        rw.load_function("my_rewards:not_callable")
    with pytest.raises(ValueError, match="expected 'package.module:function'"):
        rw.load_function("my_rewards")


def test_call_function_columns_none_and_every_validation_error(funcs, monkeypatch):
    monkeypatch.syspath_prepend(str(funcs))
    f = lambda name: rw.load_function(f"my_rewards:{name}")
    prompts, comps, cols = (
        ["a", "b", "c"],
        ["x", "yy", "zzz"],
        {"answer": ["1", "2", "3"], "other": [0, 0, 0]},
    )
    np.testing.assert_array_equal(rw.call_function(f("length"), "length", prompts, comps, cols), [1, 2, 3])
    got = rw.call_function(f("answer_given"), "answer_given", prompts, comps, cols)  # column by name
    assert got[0] == 1.0 and math.isnan(got[1]) and got[2] == 1.0  # None -> NaN (skipped)
    np.testing.assert_array_equal(
        rw.call_function(f("as_array"), "as_array", prompts, comps, cols), [0, 1, 2]
    )
    errors = {
        "wrong_length": (ValueError, r"'wrong_length' returned 1 values for 3 completions"),
        "not_a_number": (TypeError, r"'not_a_number': value 1 is 'high' \(str\), not a number"),
        "nan": (ValueError, r"'nan': value 1 is nan \(not finite"),
        "inf": (ValueError, r"'inf': value 0 is inf \(not finite"),
        "as_dict": (TypeError, r"'as_dict' returned a dict, expected a list of floats"),
    }
    for name, (exc, msg) in errors.items():
        with pytest.raises(exc, match=msg):
            rw.call_function(f(name), name, prompts, comps, cols)
    with pytest.raises(TypeError, match="missing 1 required keyword-only argument|answer"):
        rw.call_function(f("answer_given"), "answer_given", prompts, comps, {})


def test_tiny_rule():
    prompts = ["What is 7 + 5?", "What is 7 + 5?", "What is 9 - 4?", "Tell me a joke"]
    comps = ["Sure! 7 + 5 = 12. Hope this helps!", "7 + 5 = 2", "5", "no"]
    assert rw.tiny_rule(prompts, comps) == [1.0, 0.0, 0.5, None]


def test_reward_config_contract(funcs):
    with pytest.raises(ValueError, match="set reward.path .* and/or reward.function"):
        rw.RewardConfig().check()
    with pytest.raises(ValueError, match="set reward.path"):
        rw.RewardConfig(path=None, function=None).check()
    cfg = rw.RewardConfig(path=None, function=f"{funcs}/my_rewards.py:length")
    assert cfg.function == (f"{funcs}/my_rewards.py:length",) and cfg.names == cfg.function
    assert cfg.check()[0](["p"], ["ab"]) == [2.0]
    with pytest.raises(ImportError, match="cannot import"):
        rw.RewardConfig(function=("tiny", "nowhere_mod:f")).check()  # before anything compiles
    with pytest.raises(ValueError, match=r"weights has 1 entries for 2 terms"):
        rw.RewardConfig(function=("tiny", "tiny"), weights=[1.0]).check()
    with pytest.raises(ValueError, match="clip must be > 0"):
        rw.RewardConfig(function="tiny", clip=0.0)
    with pytest.raises(ValueError, match="cannot both be set"):
        rw.RewardConfig(function="tiny", no_stop_penalty=1.0, no_stop_score=-1.0)
    with pytest.raises(FileNotFoundError, match="not a stage checkpoint"):
        rw.RewardConfig(path=str(funcs)).check()


def _prompt_batch(tmp_path, tok) -> pl.PromptBatch:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))
    cfg = data.DataConfig(path=str(path), max_length=32, batch_size=4, shuffle=False)
    return next(pl.build_prompt_loader(cfg, tok))


SAMPLING = SamplingConfig(max_new_tokens=8, n=2, stop_token_ids=tuple(range(3, 320, 6)))


def test_python_rewards_weights_none_and_no_stop_score(tmp_path, funcs, tiny_tokenizer):
    tok, spec = tiny_tokenizer, _tiny.SPECS["llama"]
    batch = _prompt_batch(tmp_path, tok)
    cfg = rw.RewardConfig(
        function=(f"{funcs}/my_rewards.py:length", f"{funcs}/my_rewards.py:answer_given"),
        weights=(0.5, 2.0),
        no_stop_score=-3.0,
    )
    rewards = rw.build_rewards(cfg, tok)
    assert rewards.names == cfg.function and rewards.scorer is None
    models_ = rl.RolloutModels(rl.Actor(spec, _tiny.params("llama")), no_ref=True)
    for seed in range(8):  # a key whose rollout has rows that stopped and rows that did not
        ro = rl.rollout(models_, rewards, batch, jax.random.key(seed), SAMPLING)
        if np.asarray(ro.ended).any() and not np.asarray(ro.ended).all():
            break
    comps = rl.decode_completions(tok, ro.tokens, ro.mask)
    lengths = np.asarray([len(c) for c in comps], np.float32)
    odd = np.asarray([int(PROMPTS[int(batch.index[r // 2])]["answer"]) % 2 == 1 for r in range(8)])
    terms = np.asarray(ro.reward_terms)
    np.testing.assert_array_equal(terms[:, 0], lengths)
    np.testing.assert_array_equal(np.isnan(terms[:, 1]), ~odd)
    want = 0.5 * lengths + 2.0 * odd
    ended = np.asarray(ro.ended)
    assert ended.any() and not ended.all()
    np.testing.assert_allclose(np.asarray(ro.scores), np.where(ended, want, -3.0), atol=1e-5)
    assert not np.asarray(ro.raw_scores).any()


def _save_rm(path, spec, params, head, tok_dir, stats):
    return train.save_stage(
        path, spec, params, tokenizer_dir=tok_dir, stage_info={"stage": "rm"},
        extras={"reward_head": head}, json_extras={"reward_stats": stats},
    )  # fmt: skip


def test_reward_model_reward_normalised_and_tokenizer_mismatch(tmp_path, tiny_tokenizer, other_tokenizer):
    tok, spec = tiny_tokenizer, _tiny.SPECS["llama"]
    base, head = _tiny.params("llama", seed=5), _tiny.head("llama", 3, 0.2)
    same = _save_rm(str(tmp_path / "rm_same"), spec, base, head, tok.path, {"mean": 0.3, "std": 1.7})
    rm_spec = dataclasses.replace(spec, vocab_size=other_tokenizer.vocab_size)
    rm_params = jax.tree.map(lambda x: x, base)
    rm_params["embed_tokens"] = {
        "embedding": np.random.default_rng(0).normal(size=(rm_spec.vocab_size, 32)).astype(np.float32)
    }
    rm_params["lm_head"] = {
        "kernel": np.random.default_rng(1).normal(size=(32, rm_spec.vocab_size)).astype(np.float32)
    }
    other = _save_rm(str(tmp_path / "rm_other"), rm_spec, rm_params, head, other_tokenizer.path,
                     {"mean": -1.0, "std": 2.0})  # fmt: skip
    batch = _prompt_batch(tmp_path, tok)
    models_ = rl.RolloutModels(rl.Actor(spec, _tiny.params("llama")), no_ref=True)
    score = jax.jit(reward_model.score, static_argnums=0)

    # same tokenizer: the RM scores prompt ++ completion on device, normalised by reward_stats.json
    rewards = rw.build_rewards(rw.RewardConfig(path=same), tok)
    assert rewards.stats == (0.3, 1.7) and rewards.rm_tokenizer is None
    ro = rl.rollout(models_, rewards, batch, jax.random.key(1), SAMPLING)
    ids = np.concatenate([ro.prompt_ids, ro.tokens], 1)
    mask = np.concatenate([np.asarray(ro.prompt_mask), np.asarray(ro.mask) > 0], 1).astype(np.int32)
    raw = np.asarray(score(spec, base, head, ids, mask))
    np.testing.assert_allclose(np.asarray(ro.raw_scores), raw, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ro.scores), (raw - 0.3) / 1.7, atol=1e-5)
    ro2 = rl.rollout(models_, rewards, batch, jax.random.key(1), SAMPLING, rm_stats=np.asarray([1.0, 0.5]))
    np.testing.assert_allclose(np.asarray(ro2.scores), (raw - 1.0) / 0.5, atol=1e-5)  # running normaliser

    # another tokenizer: an error before anything is loaded or compiled, unless retokenize
    with pytest.raises(
        ValueError, match=r"tokenizer .* differs from the policy's .* reward.retokenize: true"
    ):
        rw.RewardConfig(path=other).check(tok)
    rewards = rw.build_rewards(rw.RewardConfig(path=other, retokenize=True), tok)
    ro = rl.rollout(models_, rewards, batch, jax.random.key(1), SAMPLING)
    comps = rl.decode_completions(tok, ro.tokens, ro.mask)
    seqs = []
    for r, c in enumerate(comps):
        prompt = PROMPTS[int(batch.index[r // 2])]["prompt"]
        o = other_tokenizer
        seqs.append(
            list(o.prefix_ids) + o.encode(prompt) + o.encode(c) + [o.eos_token_id] * bool(ro.ended[r])
        )
    width = generation.bucket_length(max(map(len, seqs)))
    ids = data.packing.pad_right(seqs, width, other_tokenizer.pad_token_id)
    mask = data.packing.pad_right([[1] * len(s) for s in seqs], width)
    raw = np.asarray(score(rm_spec, rewards.scorer.params, rewards.scorer.head, ids, mask))
    np.testing.assert_allclose(np.asarray(ro.raw_scores), raw, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ro.scores), (raw + 1.0) / 2.0, atol=1e-5)
