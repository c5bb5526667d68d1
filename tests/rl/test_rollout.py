"""rl.rollout: completion log-probs vs the generator and a plain forward, the first-ratio property, the
reference / critic / reward actors on one shared base, T5 rollouts."""

from __future__ import annotations

import dataclasses
import importlib

import jax
import numpy as np
import pytest

from jaxrlhf import generation, models, reward_model
from jaxrlhf.generation import SamplingConfig
from jaxrlhf.losses import _chunked as chunked
from jaxrlhf.models import heads
from jaxrlhf.rl import prompts as prompts_lib
from jaxrlhf.rl import rewards as rewards_lib
from tests.rl import _tiny

rl = importlib.import_module("jaxrlhf.rl.rollout")  # the module (the package exports the function)

N = 12
STATIC = ("spec", "lora_config", "temperature", "return_entropy", "return_hidden")
logprobs_jit = jax.jit(rl.completion_logprobs, static_argnames=STATIC)
forward_jit = jax.jit(models.forward, static_argnums=0)
score_jit = jax.jit(reward_model.score, static_argnames=("spec", "lora_config"))


STOP = tuple(range(3, 320, 6))  # one token in six stops a row: rows end at different steps


def _generate(name, cfg, *, lora=None, seed=0, lengths=(3, 7, 5, 1)):
    ids, mask = _tiny.prompts(lengths)
    spec, p = _tiny.SPECS[name], _tiny.params(name)
    kw = dict(lora=lora, lora_config=_tiny.LORA if lora is not None else None)
    return generation.generate(spec, p, ids, mask, jax.random.key(seed), cfg, **kw)


@pytest.mark.parametrize("name", ["llama", "gpt2", "t5"])
def test_completion_logprobs_equal_generation_and_plain_forward(name):
    """At T = 1: the generator's raw log-probs (left-padded prompts of different lengths, rows that stop
    early); at T = 0.7: log_softmax(logits / T) of a plain full forward, its entropy and hidden states."""
    spec, p = _tiny.SPECS[name], _tiny.params(name)
    res = _generate(name, SamplingConfig(max_new_tokens=N, n=2, temperature=0.7, stop_token_ids=STOP))
    valid = np.asarray(res.mask)
    assert not valid.all() and valid.sum(1).min() < N // 2, "rows must stop early"
    assert len(set(valid.sum(1).tolist())) > 2, "rows must stop at different steps"
    args = (res.prompt_ids, res.prompt_mask, res.tokens, res.mask)
    got = logprobs_jit(spec, p, *args)
    np.testing.assert_allclose(np.asarray(got), np.asarray(res.raw_logprobs), atol=1e-5, rtol=0)
    assert np.all(np.asarray(got)[~valid] == 0)

    lp, ent, hid = logprobs_jit(spec, p, *args, temperature=0.7, return_entropy=True, return_hidden=True)
    P = res.prompt_ids.shape[1]
    if spec.is_encoder_decoder:
        out = forward_jit(
            spec, p, res.prompt_ids, res.prompt_mask, decoder_input_ids=res.decoder_input_ids(0)
        )
        logits, hidden = out.logits, out.hidden
    else:
        out = forward_jit(spec, p, *res.sequences())
        logits, hidden = out.logits[:, P - 1 : -1], out.hidden[:, P - 1 : -1]
    logp = np.asarray(jax.nn.log_softmax(logits / 0.7, axis=-1), np.float64)
    want = np.take_along_axis(logp, np.asarray(res.tokens)[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(lp), np.where(valid, want, 0), atol=1e-5)
    want_ent = -(np.exp(logp) * logp).sum(-1)
    np.testing.assert_allclose(np.asarray(ent), np.where(valid, want_ent, 0), atol=1e-4)
    # (past a row's end T5's decoder mask hides the pads, so only valid positions are compared)
    np.testing.assert_allclose(np.asarray(hid)[valid], np.asarray(hidden)[valid], atol=1e-5)
    assert np.abs(np.asarray(lp) - np.asarray(res.raw_logprobs))[valid].max() > 1e-2


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_completion_logprobs_never_build_full_f32_logits(name):
    """Decoder-only log-probs + entropy (and their gradient) go through the chunked head: the compiled
    pass holds no f32 [R, N, V] array (16 rows x 300 completion tokens: 2048-token chunks are three chunks of
    100 positions)."""
    spec, p = _tiny.SPECS[name], _tiny.params(name)
    rows, n = 16, 300
    r = np.random.default_rng(0)
    prompt_ids = r.integers(4, spec.vocab_size, (rows, 5)).astype(np.int32)
    tokens = r.integers(4, spec.vocab_size, (rows, n)).astype(np.int32)
    args = (prompt_ids, np.ones_like(prompt_ids), tokens, np.ones_like(tokens))

    def loss(params):
        lp, ent = rl.completion_logprobs(spec, params, *args, return_entropy=True)
        return lp.sum() + ent.sum()

    hlo = jax.jit(jax.value_and_grad(loss)).lower(p).compile().as_text()
    assert f"f32[{rows},{n},{spec.vocab_size}]" not in hlo
    assert chunked.DEFAULT_CHUNK_TOKENS == 2048
    assert f"f32[{rows},{n // 3},{spec.vocab_size}]" in hlo  # a chunk's logits: the check can fail


def _scorer_rewards(base, name="llama", lora=None, stats=(0.0, 1.0), **kw) -> rewards_lib.Rewards:
    scorer = rl.Scorer(_tiny.SPECS[name], base, _tiny.head(name, 7, 0.3), lora, _tiny.LORA if lora else None)
    return rewards_lib.Rewards(tokenizer=None, scorer=scorer, stats=stats, weights=(1.0,), **kw)


def _batch(ids, mask) -> prompts_lib.PromptBatch:
    b = len(ids)
    texts = [" ".join(str(t) for t in r[m > 0]) for r, m in zip(ids, mask, strict=True)]
    return prompts_lib.PromptBatch(ids, mask, texts, [None] * b, {}, np.arange(b))


def _check_first_ratio(ro, spec, base, ad, lcfg, temperature):
    """Recomputing the policy's log-probs alone gives the rollout's exactly (ratio 1 in the first step)."""
    again = logprobs_jit(
        spec, base, ro.prompt_ids, ro.prompt_mask, ro.tokens, ro.mask, lora=ad, lora_config=lcfg,
        temperature=temperature,
    )  # fmt: skip
    np.testing.assert_allclose(np.asarray(again), np.asarray(ro.logprobs), atol=1e-6, rtol=0)
    ratio = np.exp(np.asarray(again) - np.asarray(ro.logprobs))
    np.testing.assert_allclose(ratio[np.asarray(ro.mask) > 0], 1.0, atol=1e-6)


def test_first_ratio_is_exactly_one_full_policy_top_p():
    spec, base = _tiny.SPECS["llama"], _tiny.params("llama")
    policy, ref = rl.Actor(spec, base), rl.Actor(spec, _tiny.params("llama", seed=1))
    cfg = SamplingConfig(max_new_tokens=N, n=2, stop_token_ids=STOP, top_p=0.8, temperature=0.9)
    ids, mask = _tiny.prompts()
    ro = rl.rollout(
        rl.RolloutModels(policy, ref), _scorer_rewards(base), _batch(ids, mask), jax.random.key(4), cfg
    )
    _check_first_ratio(ro, spec, base, None, None, 0.9)
    ref_lp = logprobs_jit(
        spec, ref.params, ro.prompt_ids, ro.prompt_mask, ro.tokens, ro.mask, temperature=0.9
    )
    np.testing.assert_allclose(np.asarray(ro.ref_logprobs), np.asarray(ref_lp), atol=1e-6, rtol=0)
    shapes = {k: np.shape(v) for k, v in ro._asdict().items()}
    assert shapes["tokens"] == shapes["values"] == (8, N) and shapes["reward_terms"] == (8, 1)
    assert shapes["scores"] == shapes["ended"] == (8,) and shapes["prompt_ids"] == ro.prompt_mask.shape
    assert set(np.unique(np.asarray(ro.mask))) <= {0.0, 1.0} and not np.asarray(ro.values).any()
    np.testing.assert_array_equal(np.asarray(ro.lengths), np.asarray(ro.mask).sum(1))


def test_reference_is_the_base_without_adapters_and_one_base_serves_three_adapter_sets():
    spec, base = _tiny.SPECS["llama"], _tiny.params("llama")
    pol_ad, crit_ad, rm_ad = (_tiny.adapters("llama", s) for s in (3, 5, 7))
    policy = rl.Actor(spec, base, pol_ad, _tiny.LORA)
    vhead = _tiny.head("llama", 11, 0.1)
    critic = rl.Critic(spec, base, vhead, crit_ad, _tiny.LORA)
    rewards = _scorer_rewards(base, lora=rm_ad, stats=(0.5, 2.0))
    models_ = rl.RolloutModels(policy, critic=critic)
    cfg = SamplingConfig(max_new_tokens=N, n=2, stop_token_ids=STOP, top_k=5, temperature=0.8)
    ids, mask = _tiny.prompts()
    ro = rl.rollout(models_, rewards, _batch(ids, mask), jax.random.key(2), cfg)
    _check_first_ratio(ro, spec, base, pol_ad, _tiny.LORA, 0.8)
    args = (ro.prompt_ids, ro.prompt_mask, ro.tokens, ro.mask)
    base_lp = logprobs_jit(spec, base, *args, temperature=0.8)
    np.testing.assert_allclose(np.asarray(ro.ref_logprobs), np.asarray(base_lp), atol=1e-6)
    valid = np.asarray(ro.mask) > 0
    assert np.abs(np.asarray(ro.ref_logprobs) - np.asarray(ro.logprobs))[valid].mean() > 1e-2
    # values: the critic adapters' hidden states through the value head, at the completion positions
    _, hid = logprobs_jit(
        spec, base, *args, lora=crit_ad, lora_config=_tiny.LORA, temperature=0.8, return_hidden=True
    )
    np.testing.assert_allclose(
        np.asarray(ro.values), np.asarray(heads.token_values(vhead, hid)) * valid, atol=1e-5
    )
    # scores: the reward adapters' score of prompt ++ completion, normalised by the stats
    seq_ids = np.concatenate([ro.prompt_ids, ro.tokens], 1)
    seq_mask = np.concatenate([np.asarray(ro.prompt_mask), valid], 1).astype(np.int32)
    raw = score_jit(spec, base, rewards.scorer.head, seq_ids, seq_mask, lora=rm_ad, lora_config=_tiny.LORA)
    np.testing.assert_allclose(np.asarray(ro.raw_scores), np.asarray(raw), atol=1e-5)
    np.testing.assert_allclose(np.asarray(ro.scores), (np.asarray(raw) - 0.5) / 2.0, atol=1e-5)
    # exactly one copy of the base among everything the rollout holds
    nbytes = lambda t: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(t))
    held = (models_.policy, models_.reference(), models_.critic, rewards.scorer)
    want = nbytes(base) + nbytes((pol_ad, crit_ad, rm_ad)) + nbytes((vhead, rewards.scorer.head))
    assert rl.parameter_bytes(held) == want
    assert sum(nbytes(m) for m in held) > 3 * nbytes(base)  # naive counting would see four bases
    treedef, index, unique = rl._dedupe(held)
    assert sum(x is jax.tree.leaves(base)[0] for x in unique) == 1 and len(index) > len(unique)


def test_critic_head_on_the_policy_backbone_shares_its_forward():
    spec, base = _tiny.SPECS["gpt2"], _tiny.params("gpt2")
    vhead = _tiny.head("gpt2", 1)
    models_ = rl.RolloutModels(
        rl.Actor(spec, base), ref=rl.Actor(spec, base), critic=rl.Critic(spec, base, vhead)
    )
    cfg = SamplingConfig(max_new_tokens=N, stop_token_ids=STOP)
    ids, mask = _tiny.prompts()
    rewards = _scorer_rewards(_tiny.params("llama"), no_stop_penalty=1.5)
    for seed in range(8):  # a key whose rollout has rows that stopped and rows that did not
        ro = rl.rollout(models_, rewards, _batch(ids, mask), jax.random.key(seed), cfg)
        if np.asarray(ro.ended).any() and not np.asarray(ro.ended).all():
            break
    _, hid = logprobs_jit(spec, base, ro.prompt_ids, ro.prompt_mask, ro.tokens, ro.mask, return_hidden=True)
    np.testing.assert_allclose(
        np.asarray(ro.values), np.asarray(heads.token_values(vhead, hid) * ro.mask), atol=1e-5
    )
    np.testing.assert_array_equal(np.asarray(ro.ref_logprobs), np.asarray(ro.logprobs))
    ended = np.asarray(ro.ended)
    assert ended.any() and not ended.all()
    want = np.asarray(ro.raw_scores) - 1.5 * (~ended)
    np.testing.assert_allclose(np.asarray(ro.scores), want, atol=1e-6)


def test_full_policy_without_reference_is_an_error():
    spec = _tiny.SPECS["llama"]
    with pytest.raises(ValueError, match="full-parameter policy needs frozen reference"):
        rl.RolloutModels(rl.Actor(spec, _tiny.params("llama"))).reference()
    assert rl.RolloutModels(rl.Actor(spec, _tiny.params("llama")), no_ref=True).reference() is None


def test_t5_rollout_with_decoder_value_head_and_reward_model():
    spec, base = _tiny.SPECS["t5"], _tiny.params("t5")
    ad = _tiny.adapters("t5", 3)
    vhead = _tiny.head("t5", 2)
    critic = rl.Critic(spec, base, vhead, _tiny.adapters("t5", 4), _tiny.LORA)
    scorer = rl.Scorer(spec, base, _tiny.head("t5", 5), _tiny.adapters("t5", 6), _tiny.LORA)
    rewards = rewards_lib.Rewards(tokenizer=None, scorer=scorer, weights=(1.0,))
    rewards = dataclasses.replace(rewards, tokenizer=_IdTokenizer())
    cfg = SamplingConfig(max_new_tokens=N, n=2, stop_token_ids=STOP)
    ids, mask = _tiny.prompts()
    ro = rl.rollout(rl.RolloutModels(rl.Actor(spec, base, ad, _tiny.LORA), critic=critic), rewards,
                    _batch(ids, mask), jax.random.key(1), cfg)  # fmt: skip
    args = (ro.prompt_ids, ro.prompt_mask, ro.tokens, ro.mask)
    np.testing.assert_allclose(
        np.asarray(ro.logprobs),
        np.asarray(logprobs_jit(spec, base, *args, lora=ad, lora_config=_tiny.LORA)),
        atol=1e-6,
    )
    np.testing.assert_allclose(
        np.asarray(ro.ref_logprobs), np.asarray(logprobs_jit(spec, base, *args)), atol=1e-6
    )
    _, hid = logprobs_jit(spec, base, *args, lora=critic.lora, lora_config=_tiny.LORA, return_hidden=True)
    np.testing.assert_allclose(
        np.asarray(ro.values), np.asarray(heads.token_values(vhead, hid) * ro.mask), atol=1e-5
    )
    assert np.abs(np.asarray(ro.values)).sum() > 0
    # T5 policies: the RM reads prompt text ++ completion text re-encoded on the host (+ EOS when ended)
    tok, rows = _IdTokenizer(), []
    for r in range(ro.tokens.shape[0]):
        prompt = np.asarray(ids[r // 2])[np.asarray(mask[r // 2]) > 0]
        comp = np.asarray(ro.tokens[r])[np.asarray(ro.mask[r]) > 0]
        rows.append(
            list(prompt) + [int(t) for t in comp if int(t) not in (0, 1, 2)] + [2] * bool(ro.ended[r])
        )
    width = generation.bucket_length(max(map(len, rows)))
    rm_ids = np.asarray([r + [0] * (width - len(r)) for r in rows], np.int32)
    rm_mask = np.asarray([[1] * len(r) + [0] * (width - len(r)) for r in rows], np.int32)
    want = score_jit(spec, base, scorer.head, rm_ids, rm_mask, lora=scorer.lora, lora_config=_tiny.LORA)
    np.testing.assert_allclose(np.asarray(ro.raw_scores), np.asarray(want), atol=1e-5)
    assert tok.decode([5, 1]) == "5 1" and np.std(np.asarray(ro.raw_scores)) > 0


class _IdTokenizer:
    """A stand-in tokenizer over raw ids (text = space-separated ids) for the T5 host path."""

    prefix_ids, eos_token_id, pad_token_id, chat_template = (), 2, 0, None

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(str(int(i)) for i in ids if not (skip_special_tokens and int(i) in (0, 1, 2)))

    def encode(self, text):
        return [int(t) for t in text.split()]
