"""Rollouts for the PPO tests: sampled by ``generation.generate``, scored with
``rl.rollout.completion_logprobs`` (the update's own log-prob function) for the policy, the reference and the
critic's hidden states."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf import generation, rl
from jaxrlhf.generation import SamplingConfig
from jaxrlhf.models import heads
from jaxrlhf.rl import prompts as prompts_lib
from jaxrlhf.rl import rollout as rollout_lib
from tests.rl import _tiny

STATIC = ("spec", "lora_config", "temperature", "return_entropy", "return_hidden")
logprobs_jit = jax.jit(rollout_lib.completion_logprobs, static_argnames=STATIC)


def actor(ppo_models: rl.PPOModels, state: rl.PPOState, frozen: rl.PPOFrozen, which: str):
    """``(spec, params, lora, lora_config)`` of the policy or critic backbone of ``state``."""
    if which == "policy":
        spec, cfg, tree, base = (
            ppo_models.policy_spec,
            ppo_models.policy_lora,
            state.policy,
            frozen.policy_base,
        )
    else:
        spec, cfg, tree, base = (
            ppo_models.critic_spec,
            ppo_models.critic_lora,
            state.critic["backbone"],
            frozen.critic_base,
        )
    return (spec, tree, None, None) if cfg is None else (spec, base, tree, cfg)


def make_rollout(ppo_models, state, frozen, ref_params, *, n_prompts=4, n=2, new=8, seed=0, temperature=1.0):
    """A Rollout of ``n_prompts * n`` rows: completions of the current policy, its old log-probs, the
    reference's, the critic's values and random sequence scores (``raw_scores = 2 * scores + 1``)."""
    spec, p, lo, cfg = actor(ppo_models, state, frozen, "policy")
    lengths = (3, 7, 5, 1, 4, 6, 2, 8)[:n_prompts]
    ids, mask = _tiny.prompts(lengths, seed=seed)
    sampling = SamplingConfig(max_new_tokens=new, n=n, temperature=temperature)
    gen = generation.generate(spec, p, ids, mask, jax.random.key(seed), sampling, lora=lo, lora_config=cfg)
    inputs = (gen.prompt_ids, gen.prompt_mask, gen.tokens, gen.mask)
    logprobs = logprobs_jit(spec, p, *inputs, lora=lo, lora_config=cfg, temperature=temperature)
    ref = logprobs_jit(spec, ref_params, *inputs, temperature=temperature)
    c_spec, cp, clo, ccfg = actor(ppo_models, state, frozen, "critic")
    _, hidden = logprobs_jit(
        c_spec, cp, *inputs, lora=clo, lora_config=ccfg, temperature=temperature, return_hidden=True
    )
    m = gen.mask.astype(jnp.float32)
    values = heads.token_values(state.critic["head"], hidden) * m
    rows = gen.tokens.shape[0]
    scores = jnp.asarray(np.random.default_rng(seed).normal(size=rows), jnp.float32)
    return rollout_lib.Rollout(
        prompt_ids=gen.prompt_ids, prompt_mask=gen.prompt_mask.astype(bool), tokens=gen.tokens, mask=m,
        logprobs=logprobs, ref_logprobs=ref, values=values, scores=scores, ended=jnp.any(m > 0, axis=1),
        raw_scores=2 * scores + 1, reward_terms=scores[:, None], lengths=jnp.sum(m, axis=1).astype(jnp.int32),
    )  # fmt: skip


def real_rollout(ppo_models, state, frozen, *, n_prompts=4, n=2, new=8, seed=0):
    """A Rollout from helper rollout's ``rl.rollout`` (policy / base-as-reference / critic of ``state``, a
    reward model = the base + a head, normalised by the state's running statistics)."""
    lengths = (3, 7, 5, 1, 4, 6, 2, 8)[:n_prompts]
    ids, mask = _tiny.prompts(lengths, seed=seed)
    texts = [" ".join(str(t) for t in r[m > 0]) for r, m in zip(ids, mask, strict=True)]
    batch = prompts_lib.PromptBatch(ids, mask, texts, [None] * len(ids), {}, np.arange(len(ids)))
    scorer = rl.Scorer(ppo_models.policy_spec, frozen.policy_base, _tiny.head("llama", 7, 0.3))
    rewards = rl.Rewards(tokenizer=None, scorer=scorer, weights=(1.0,))
    models_ = rl.rollout_models(ppo_models, state, frozen)
    sampling = SamplingConfig(max_new_tokens=new, n=n)
    return rollout_lib.rollout(
        models_, rewards, batch, jax.random.key(seed), sampling, rm_stats=rl.rm_stats(state)
    )


def copy(tree):
    return jax.tree.map(jnp.copy, tree)


@functools.cache
def lora_setup(name: str = "llama"):
    """LoRA policy and LoRA critic (own adapters + head) over one shared base; the reference is the base."""
    spec = _tiny.SPECS[name]
    base = _tiny.params(name)
    ppo_models = rl.PPOModels(spec, spec, policy_lora=_tiny.LORA, critic_lora=_tiny.LORA)
    policy = _tiny.adapters(name, 1, base)
    critic = {"backbone": _tiny.adapters(name, 2, base), "head": _tiny.head(name, 3)}
    return ppo_models, rl.PPOFrozen(base, base), policy, critic
