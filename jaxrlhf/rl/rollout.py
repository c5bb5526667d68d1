"""Rollouts for every RL stage: sample completions, then score them in ONE jitted pass -> :class:`Rollout`.

    prompts --generation.generate--> tokens, mask                          (policy, SamplingConfig)
            --host--> decoded text -> Python rewards, re-tokenised RM inputs (rewards.py; only when needed)
            --one jit--> logprobs (policy), ref_logprobs (reference), values (critic), RM scores -> scores

Log-probs, the only place they are computed (the PPO update calls the same function, so its first ratio is
exactly 1): for prompts ``x [R, P]`` (left-padded) and completions ``y [R, N]`` with mask ``m``,

    decoder-only:  h = forward(x ++ y).hidden[:, P-1 : P+N-1]       (the positions that predict y_0..y_{N-1})
    T5:            h = forward(enc=x, dec=[start] ++ y[:, :-1]).hidden
    z = lm_head(h) / T,   logprobs[r, t] = m[r, t] * (z[r, t, y_rt] - logsumexp_v z[r, t, v])
    entropy[r, t]  = m[r, t] * (logsumexp_v z - sum_v softmax(z)_v z_v)      (untruncated, temperature T)

Values are the critic's value head at the same positions (the state before token t): ``head(h_critic)``.
The LM head runs only on the N completion positions (the full forward's unused logits are removed by XLA).

Models are described by small pytrees whose arrays are leaves and whose spec / LoRA config are static
(:class:`Actor`, :class:`Critic`, :class:`Scorer`). Several of them may share one base params tree (policy,
critic and reward adapters over one frozen base; the reference = the base with ``lora=None``): the scoring
pass passes every distinct array once (by identity), so the jitted function holds one copy of the base.

Multi-host: prompt batches are global arrays (``jax.make_array_from_process_local_data``); everything read
back to the host (tokens to decode) is gathered first with ``multihost_utils.process_allgather`` when not
fully addressable, each process scores its own rows with the Python rewards, and host results go back as
global arrays (:mod:`jaxrlhf.rl.prompts`).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf import generation, models, reward_model
from jaxrlhf.generation import SamplingConfig
from jaxrlhf.losses import chunked_token_logprobs
from jaxrlhf.models import heads
from jaxrlhf.models.spec import ModelSpec
from jaxrlhf.rl import prompts as prompts_lib

__all__ = [
    "Actor",
    "Critic",
    "Rollout",
    "RolloutModels",
    "Scorer",
    "completion_logprobs",
    "decode_completions",
    "parameter_bytes",
    "rollout",
    "token_logprobs_entropy",
]


def _pytree(data: tuple[str, ...], meta: tuple[str, ...]):
    """A frozen dataclass registered as a pytree: ``data`` fields are children, ``meta`` fields static."""

    def wrap(cls):
        cls = dataclasses.dataclass(frozen=True, eq=False)(cls)
        return jax.tree_util.register_dataclass(cls, data_fields=list(data), meta_fields=list(meta))

    return wrap


@_pytree(data=("params", "lora"), meta=("spec", "lora_config"))
class Actor:
    """A language model: ``spec`` + ``params`` (+ LoRA ``lora`` adapters with ``lora_config``).

    The policy, or the reference (frozen params, or the policy's base with ``lora=None``: no copy).
    """

    spec: ModelSpec
    params: Any
    lora: Any = None
    lora_config: Any = None


@_pytree(data=("params", "head", "lora"), meta=("spec", "lora_config"))
class Critic:
    """A value model: backbone ``params`` (+ adapters) and a value head ``{"kernel" [E, 1], "bias" [1]}``.

    A separate backbone (e.g. initialised from the reward model), or an adapter set on the shared base.
    """

    spec: ModelSpec
    params: Any
    head: Any
    lora: Any = None
    lora_config: Any = None


@_pytree(data=("params", "head", "lora"), meta=("spec", "lora_config"))
class Scorer:
    """A reward model on device (see :func:`jaxrlhf.reward_model.score`)."""

    spec: ModelSpec
    params: Any
    head: Any
    lora: Any = None
    lora_config: Any = None

    @classmethod
    def from_reward_model(cls, rm: reward_model.RewardModel) -> Scorer:
        return cls(rm.spec, rm.params, rm.head, rm.lora, rm.lora_config)


@dataclasses.dataclass(frozen=True, eq=False)
class RolloutModels:
    """The models of a rollout. ``ref=None``: the policy's base without its adapters (LoRA policies only).

    ``critic=None``: values are zero (GRPO / RLOO). ``no_ref=True``: no reference forward, ``ref_logprobs``
    = ``logprobs`` (a zero KL term; GRPO with ``beta = 0``).
    """

    policy: Actor
    ref: Actor | None = None
    critic: Critic | None = None
    no_ref: bool = False

    def reference(self) -> Actor | None:
        if self.no_ref:
            return None
        if self.ref is not None:
            return self.ref
        if self.policy.lora is None:
            raise ValueError(
                "RolloutModels: a full-parameter policy needs frozen reference params (ref=Actor(spec, "
                "frozen_params)); ref=None means 'the base with the policy adapters left out' (LoRA only); "
                "pass no_ref=True for no reference"
            )
        return Actor(self.policy.spec, self.policy.params)


class Rollout(NamedTuple):
    """One batch of experience; R = prompts x n rows (row ``b*n + i`` = sample i of prompt b), N slots.

    prompt_ids   [R, P] int32  left-padded prompts as the model saw them; prompt_mask [R, P] bool
    tokens       [R, N] int32  completion tokens (pad after the stop token)
    mask         [R, N] f32    1.0 for valid tokens, through the first stop token
    logprobs     [R, N] f32    policy log_softmax(logits / T)[token] (untruncated), 0 where masked
    ref_logprobs [R, N] f32    the same under the reference model; 0 where masked
    values       [R, N] f32    critic value at each completion position (state before token t); 0 masked
    scores       [R]    f32    sum_k w_k reward_k (NaN terms skipped), clipped, + no-stop rule
    ended        [R]    bool   the completion reached a stop token within N
    raw_scores   [R]    f32    the reward model's un-normalised score (0 without a reward model)
    reward_terms [R, K] f32    per-term rewards before weighting (RM normalised, then Python functions;
                               NaN where a function returned None), K = len(Rewards.names)
    lengths      [R]    int32  valid completion tokens
    """

    prompt_ids: jax.Array
    prompt_mask: jax.Array
    tokens: jax.Array
    mask: jax.Array
    logprobs: jax.Array
    ref_logprobs: jax.Array
    values: jax.Array
    scores: jax.Array
    ended: jax.Array
    raw_scores: jax.Array
    reward_terms: jax.Array
    lengths: jax.Array


# ---------------------------------------------------------------------------------------------- log-probs


def token_logprobs_entropy(
    logits: jax.Array, tokens: jax.Array, *, temperature: float = 1.0
) -> tuple[jax.Array, jax.Array]:
    """``(log p(tokens), entropy)`` of ``softmax(logits / T)``; logits [..., V], tokens [...] -> [...] f32."""
    z = logits.astype(jnp.float32)
    if temperature != 1.0:
        z = z / jnp.float32(temperature)
    lse = jax.nn.logsumexp(z, axis=-1)
    picked = jnp.take_along_axis(z, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
    entropy = lse - jnp.sum(jax.nn.softmax(z, axis=-1) * z, axis=-1)
    return picked - lse, entropy


def completion_logprobs(
    spec: ModelSpec,
    params: Any,
    prompt_ids: jax.Array,  # [R, P] int, left-padded (last column is a real token)
    prompt_mask: jax.Array,  # [R, P]
    tokens: jax.Array,  # [R, N] int
    mask: jax.Array,  # [R, N] (bool or float; > 0 = valid)
    *,
    lora: Any = None,
    lora_config: Any = None,
    temperature: float = 1.0,
    compute_dtype: Any = None,
    attention_impl: str = "plain",
    return_entropy: bool = False,
    return_hidden: bool = False,
    dropout_rng: jax.Array | None = None,
    remat: str = "none",
):
    """Per-token log-probs ``[R, N]`` of the completions (math in the module docstring); 0 where masked.

    Returns ``logprobs``, or a tuple ``(logprobs, entropy [R, N]?, hidden [R, N, E]?)`` with the requested
    extras in that order; ``hidden`` are the final hidden states at the completion positions (what a value
    head on this backbone reads). Decoder-only prompts must be left-padded (as ``GenerateResult.prompt_ids``
    are): position ``P - 1`` predicts the first completion token. ``dropout_rng`` enables LoRA dropout;
    ``remat`` (``none`` / ``full`` / ``save_dots``) rematerialises the blocks in a gradient pass.
    """
    valid = mask > 0
    fkw = dict(
        lora=lora,
        lora_config=lora_config,
        compute_dtype=compute_dtype,
        attention_impl=attention_impl,
        dropout_rng=dropout_rng,
        remat=remat,
    )
    if spec.is_encoder_decoder:
        start = spec.decoder_start_token_id if spec.decoder_start_token_id is not None else 0
        first = jnp.full((tokens.shape[0], 1), start, jnp.int32)
        dec_ids = jnp.concatenate([first, tokens[:, :-1].astype(jnp.int32)], axis=1)
        dec_mask = jnp.concatenate([jnp.ones_like(first, bool), valid[:, :-1]], axis=1)
        out = models.forward(
            spec, params, prompt_ids, prompt_mask, decoder_input_ids=dec_ids,
            decoder_attention_mask=dec_mask.astype(jnp.int32), **fkw,
        )  # fmt: skip
        hidden = out.hidden
    else:
        p, n = prompt_ids.shape[1], tokens.shape[1]
        ids = jnp.concatenate([prompt_ids.astype(jnp.int32), tokens.astype(jnp.int32)], axis=1)
        full_mask = jnp.concatenate([prompt_mask > 0, valid], axis=1).astype(jnp.int32)
        # one run of real tokens per row (left-padded prompt + completion up to its stop): the fused
        # attention takes its length + offset, no [R, 1, P+N, P+N] mask
        out = models.forward(spec, params, ids, full_mask, max_segments=1, **fkw)
        hidden = out.hidden[:, p - 1 : p + n - 1]
    if spec.is_encoder_decoder:  # T5's head may carry LoRA and rescales: the plain head
        logits = models.lm_head(
            spec, params, hidden, lora=lora, lora_config=lora_config, compute_dtype=compute_dtype
        )
        logprobs, entropy = token_logprobs_entropy(logits, tokens, temperature=temperature)
    else:  # the head + log-softmax in chunks of positions: no [R, N, V] f32 logits (values and grads equal)
        vm = models.lm_head_vocab_major(spec)
        h, kernel = models.lm_head_operands(spec, params, hidden, compute_dtype=compute_dtype, vocab_major=vm)
        out = chunked_token_logprobs(  # f32 logits: the PPO ratio compares these across passes
            h, kernel, tokens.astype(jnp.int32), mask=valid, temperature=temperature,
            return_entropy=return_entropy, vocab_major=vm,
        )  # fmt: skip
        logprobs, entropy = out if return_entropy else (out, None)
    logprobs = jnp.where(valid, logprobs, 0.0)
    if not (return_entropy or return_hidden):
        return logprobs
    out = (logprobs,)
    if return_entropy:
        out += (jnp.where(valid, entropy, 0.0),)
    if return_hidden:
        out += (hidden,)
    return out


# ---------------------------------------------------------------------------------------------- scoring


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static description of one scoring pass (part of the jit cache key)."""

    treedef: Any  # of (policy, ref, critic, scorer)
    index: tuple[int, ...]  # leaf i of the tree = unique[index[i]]
    temperature: float
    compute_dtype: Any
    attention_impl: str
    critic_shares_policy: bool
    rm_concat: bool  # reward-model input = prompt ++ completion (same tokenizer, decoder-only policy)
    stop_ids: tuple[int, ...]
    weights: tuple[float, ...]
    clip: float | None
    no_stop_penalty: float | None
    no_stop_score: float | None


def _dedupe(tree: Any) -> tuple[Any, tuple[int, ...], list]:
    """Flatten ``tree``; leaves that are the same object are passed once: ``(treedef, index, unique)``."""
    leaves, treedef = jax.tree.flatten(tree)
    seen: dict[int, int] = {}
    unique, index = [], []
    for leaf in leaves:
        if id(leaf) not in seen:
            seen[id(leaf)] = len(unique)
            unique.append(leaf)
        index.append(seen[id(leaf)])
    return treedef, tuple(index), unique


@functools.partial(jax.jit, static_argnames=("plan",))
def _score(plan: _Plan, unique, prompt_ids, prompt_mask, tokens, mask, rm_ids, rm_mask, py_terms, rm_stats):
    policy, ref, critic, scorer = jax.tree.unflatten(plan.treedef, [unique[i] for i in plan.index])
    kw = dict(
        temperature=plan.temperature, compute_dtype=plan.compute_dtype, attention_impl=plan.attention_impl
    )

    def logprobs_of(m, **extra):
        # a barrier per forward: XLA must not share work between forwards of one base (CSE of the first
        # layers' base matmuls changes their fusion and rounding), so each forward computes what a call of
        # completion_logprobs alone computes and the PPO update's first ratio is 1 to float precision
        args = jax.lax.optimization_barrier((m.params, m.lora, prompt_ids, prompt_mask, tokens, mask))
        params, lora, *inputs = args
        return completion_logprobs(
            m.spec, params, *inputs, lora=lora, lora_config=m.lora_config, **kw, **extra
        )  # fmt: skip

    maskf = mask.astype(jnp.float32)
    if plan.critic_shares_policy:
        logprobs, hidden = logprobs_of(policy, return_hidden=True)
    else:
        logprobs = logprobs_of(policy)
        hidden = None if critic is None else logprobs_of(critic, return_hidden=True)[1]
    ref_logprobs = logprobs if ref is None else logprobs_of(ref)
    values = jnp.zeros_like(maskf) if critic is None else heads.token_values(critic.head, hidden) * maskf
    is_stop = jnp.isin(tokens, jnp.asarray(plan.stop_ids or (-1,), jnp.int32))
    ended = jnp.any(is_stop & (mask > 0), axis=1)

    rows = tokens.shape[0]
    terms = jnp.zeros((rows, 0), jnp.float32) if py_terms is None else py_terms.astype(jnp.float32)
    raw = jnp.zeros((rows,), jnp.float32)
    if scorer is not None:
        if plan.rm_concat:
            rm_ids = jnp.concatenate([prompt_ids, tokens], axis=1).astype(jnp.int32)
            rm_mask = jnp.concatenate([prompt_mask > 0, mask > 0], axis=1).astype(jnp.int32)
        params, lora, rm_ids, rm_mask = jax.lax.optimization_barrier(
            (scorer.params, scorer.lora, rm_ids, rm_mask)
        )
        raw = reward_model.score(
            scorer.spec, params, scorer.head, rm_ids, rm_mask, lora=lora,
            lora_config=scorer.lora_config, compute_dtype=plan.compute_dtype,
            attention_impl=plan.attention_impl, max_segments=1,
        )  # fmt: skip
        normed = (raw - rm_stats[0]) / jnp.maximum(rm_stats[1], 1e-8)
        terms = jnp.concatenate([normed[:, None], terms], axis=1)
    scores = jnp.nansum(terms * jnp.asarray(plan.weights, jnp.float32), axis=1)
    if plan.clip is not None:
        scores = jnp.clip(scores, -plan.clip, plan.clip)
    if plan.no_stop_penalty is not None:
        scores = jnp.where(ended, scores, scores - plan.no_stop_penalty)
    if plan.no_stop_score is not None:
        scores = jnp.where(ended, scores, jnp.float32(plan.no_stop_score))
    return logprobs, ref_logprobs, values, scores, ended, raw, terms


def rollout(
    models_: RolloutModels,
    rewards: Any,  # jaxrlhf.rl.rewards.Rewards
    batch: prompts_lib.PromptBatch,
    rng: jax.Array,
    sampling: SamplingConfig,
    *,
    rm_stats: tuple[float, float] | jax.Array | None = None,
    compute_dtype: Any = None,
    attention_impl: str = "plain",
    mesh: Any = None,
    kv_segments: int | None = None,
    timings: dict | None = None,
) -> Rollout:
    """Sample ``sampling.n`` completions per prompt with the policy, then score them (module docstring).

    ``timings``: a dict that receives ``generation_seconds`` (sampling, waited for) and ``scoring_seconds``
    (host rewards + the scoring pass, waited for); None = no extra synchronisation.

    ``rm_stats``: ``(mean, std)`` that normalise the reward model's score (an array, e.g. the PPO state's
    running normaliser; no recompilation when it changes); default ``rewards.stats`` (reward_stats.json).
    The scoring temperature is ``sampling.temperature`` (1.0 when greedy).
    """
    policy = models_.policy
    t_start = time.perf_counter()
    gen = generation.generate(
        policy.spec, policy.params, batch.prompt_ids, batch.prompt_mask, rng, sampling,
        lora=policy.lora, lora_config=policy.lora_config, compute_dtype=compute_dtype,
        attention_impl=attention_impl, mesh=mesh, kv_segments=kv_segments,
    )  # fmt: skip
    if timings is not None:
        jax.block_until_ready(gen.tokens)
        t_gen = time.perf_counter()
        timings["generation_seconds"] = t_gen - t_start
    stop_ids = sampling.stop_token_ids if sampling.stop_token_ids is not None else policy.spec.eos_token_ids
    host = rewards.host_inputs(
        gen, batch, sampling.n, encoder_decoder=policy.spec.is_encoder_decoder, stop_ids=stop_ids, mesh=mesh
    )
    critic = models_.critic
    shares = critic is not None and critic.params is policy.params and critic.lora is policy.lora
    tree = (policy, models_.reference(), critic, rewards.scorer)
    treedef, index, unique = _dedupe(tree)
    plan = _Plan(
        treedef=treedef,
        index=index,
        temperature=float(sampling.temperature) if sampling.temperature > 0 else 1.0,
        compute_dtype=compute_dtype,
        attention_impl=attention_impl,
        critic_shares_policy=shares,
        rm_concat=host.rm_ids is None,
        stop_ids=tuple(int(i) for i in stop_ids),
        weights=rewards.weights,
        clip=rewards.clip,
        no_stop_penalty=rewards.no_stop_penalty,
        no_stop_score=rewards.no_stop_score,
    )
    stats = jnp.asarray(rewards.stats if rm_stats is None else rm_stats, jnp.float32)
    outs = _score(
        plan, unique, gen.prompt_ids, gen.prompt_mask, gen.tokens, gen.mask, host.rm_ids, host.rm_mask,
        host.py_terms, stats,
    )  # fmt: skip
    logprobs, ref_logprobs, values, scores, ended, raw, terms = outs
    if timings is not None:
        jax.block_until_ready(scores)
        timings["scoring_seconds"] = time.perf_counter() - t_gen
    return Rollout(
        prompt_ids=gen.prompt_ids,
        prompt_mask=gen.prompt_mask.astype(bool),
        tokens=gen.tokens,
        mask=gen.mask.astype(jnp.float32),
        logprobs=logprobs,
        ref_logprobs=ref_logprobs,
        values=values,
        scores=scores,
        ended=ended,
        raw_scores=raw,
        reward_terms=terms,
        lengths=gen.lengths,
    )


def decode_completions(tokenizer, tokens: Any, mask: Any) -> list[str]:
    """Completion text of every row this process holds (``skip_special_tokens``; see prompts.host_rows)."""
    rows = prompts_lib.local_rows(tokens)
    toks, valid = prompts_lib.host_array(tokens)[rows], prompts_lib.host_array(mask)[rows] > 0
    return [tokenizer.decode(t[v], skip_special_tokens=True) for t, v in zip(toks, valid, strict=True)]


def parameter_bytes(tree: Any) -> int:
    """Bytes of the distinct arrays in ``tree`` (an array shared by several models counts once)."""
    _, _, unique = _dedupe(tree)
    return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape)) for x in unique))
