"""The PPO loss of one micro-batch (policy and critic forward passes + every objective term).

For a micro-batch of a minibatch with N_tok valid completion tokens and N_seq rows (``denominators``), the
per-token terms are aggregated with the minibatch's denominators (``losses.aggregate_loss``), so the
micro-batch losses and gradients *add up* to the minibatch's:

    L = L_clip(pi) - ent_coef * H(pi) [+ kl_coef * KL_k3(pi, ref)]  + ptx_coef * NLL_ptx(pi)     (policy)
        + vf_coef * L_V(V)                                                                      (critic)

The policy and the critic are separate parameter trees, so d L / d policy and d L / d critic are the
gradients of their own parts. Log-probs and entropies come from ``rl.rollout.completion_logprobs`` (the
function that produced the rollout's old log-probs), values from the critic's value head at the same
positions (``return_hidden=True`` on the critic backbone).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxrlhf import losses, models
from jaxrlhf.models import heads
from jaxrlhf.rl._ppo_config import PPOHyperParams, PPOModels

# keys of a micro-batch dict (all [rows, N] except the prompt's [rows, P])
BATCH_KEYS = (
    "prompt_ids", "prompt_mask", "tokens", "mask", "logprobs", "ref_logprobs", "values",
    "advantages", "returns",
)  # fmt: skip


def _completion_logprobs():
    from jaxrlhf.rl.rollout import completion_logprobs  # lazily: rollout imports heavier modules

    return completion_logprobs


def split_trainable(lora_config: Any, trainable: Any, base: Any) -> tuple[Any, Any]:
    """``(params, lora)`` for models.forward: full params, or the frozen base with trainable adapters."""
    if lora_config is None:
        return trainable, None
    if base is None:
        raise ValueError("a LoRA actor needs its frozen base in PPOFrozen (got None)")
    return base, trainable


def ptx_nll_sum(
    spec, params, lora, lora_config, batch: dict, *, compute_dtype, attention_impl, remat: str = "none"
) -> tuple:
    """``(sum of token NLLs, token count)`` of a pretraining batch under the policy LM (``losses.sft_loss``).

    Decoder-only: ``input_ids``, ``attention_mask``, ``loss_mask`` (+ optional ``positions``,
    ``segment_ids``); token t is predicted by position t - 1 where ``loss_mask[t] = 1``. T5: also
    ``decoder_input_ids``, ``decoder_attention_mask``, ``labels`` (the SFT stage's batches).
    """
    kw = dict(
        lora=lora, lora_config=lora_config, compute_dtype=compute_dtype, attention_impl=attention_impl,
        remat=remat,
    )  # fmt: skip
    if spec.is_encoder_decoder:
        out = models.forward(
            spec, params, batch["input_ids"], batch["attention_mask"],
            decoder_input_ids=batch["decoder_input_ids"],
            decoder_attention_mask=batch["decoder_attention_mask"], **kw,
        )  # fmt: skip
        logits, targets, mask = out.logits, batch["labels"], batch["loss_mask"]
    else:
        out = models.forward(
            spec, params, batch["input_ids"], batch["attention_mask"], positions=batch.get("positions"),
            segment_ids=batch.get("segment_ids"), **kw,
        )  # fmt: skip
        # the head + cross-entropy in chunks over the loss positions only (no [B, T, V] f32 logits)
        vm = models.lm_head_vocab_major(spec)
        h, kernel = models.lm_head_operands(
            spec, params, out.hidden, compute_dtype=compute_dtype, vocab_major=vm
        )
        targets, mask = losses.next_token_targets(batch["input_ids"], batch["loss_mask"])
        _, m = losses.chunked_sft_loss(h, kernel, targets, mask, logits_dtype=compute_dtype, vocab_major=vm)
        return m["loss_sum"], m["token_count"]
    _, m = losses.sft_loss(logits, targets, mask)
    return m["loss_sum"], m["token_count"]


def make_ppo_loss(ppo_models: PPOModels, hp: PPOHyperParams) -> Callable:
    """``loss_fn(policy, critic, frozen, batch, denominators, kl_coef, ptx, ptx_tokens, rng) -> (loss, m)``.

    ``batch``: dict of :data:`BATCH_KEYS`; ``denominators``: ``{"tokens", "seqs"}`` of the whole minibatch;
    ``ptx``: a pretraining micro-batch or None, ``ptx_tokens`` its minibatch's target-token count; ``rng``
    drives LoRA dropout. Metrics are this micro-batch's share of minibatch token means (they add up too).
    """
    completion_logprobs = _completion_logprobs()
    compute_dtype = None if hp.compute_dtype is None else jnp.dtype(hp.compute_dtype)
    fwd = dict(
        temperature=hp.temperature, compute_dtype=compute_dtype, attention_impl=hp.attention_impl,
        remat=hp.remat,
    )  # fmt: skip
    pspec, cspec = ppo_models.policy_spec, ppo_models.critic_spec
    plora, clora = ppo_models.policy_lora, ppo_models.critic_lora

    def dropout(cfg, rng, i):
        return jax.random.fold_in(rng, i) if cfg is not None and cfg.dropout > 0 else None

    def loss_fn(policy, critic, frozen, batch, denominators, kl_coef, ptx, ptx_tokens, rng):
        b = batch
        mask = b["mask"].astype(jnp.float32)
        denom = denominators["tokens"] if hp.loss_agg == "token_mean" else denominators["seqs"]
        agg = lambda x: losses.aggregate_loss(x, mask, loss_agg=hp.loss_agg, denominator=denom)
        tok = lambda x: (
            losses.masked_sum(x.astype(jnp.float32), mask) / jnp.maximum(denominators["tokens"], 1.0)
        )
        inputs = (b["prompt_ids"], b["prompt_mask"], b["tokens"], b["mask"])

        p_params, p_lora = split_trainable(plora, policy, frozen.policy_base)
        logprobs, entropy = completion_logprobs(
            pspec, p_params, *inputs, lora=p_lora, lora_config=plora, return_entropy=True,
            dropout_rng=dropout(plora, rng, 0), **fwd,
        )  # fmt: skip
        c_params, c_lora = split_trainable(clora, critic["backbone"], frozen.critic_base)
        _, hidden = completion_logprobs(
            cspec, c_params, *inputs, lora=c_lora, lora_config=clora, return_hidden=True,
            dropout_rng=dropout(clora, rng, 1), **fwd,
        )  # fmt: skip
        values = heads.token_values(critic["head"], hidden)

        pg_tok, t = losses.ppo_policy_terms(
            logprobs, b["logprobs"], b["advantages"], clip_eps=hp.clip_eps, clip_eps_high=hp.clip_eps_high,
            dual_clip=hp.dual_clip,
        )  # fmt: skip
        vf_tok, vt = losses.ppo_value_terms(values, b["values"], b["returns"], clip_eps=hp.value_clip_eps)
        pg_loss, vf_loss, ent = agg(pg_tok), agg(vf_tok), agg(entropy)
        loss = pg_loss + hp.vf_coef * vf_loss - hp.ent_coef * ent
        metrics = {
            "policy_loss": pg_loss,
            "value_loss": vf_loss,
            "entropy": tok(entropy),
            "clipfrac": tok(t["clipped"]),
            "dual_clipfrac": tok(t["dual_clipped"]),
            "approx_kl": tok(0.5 * jnp.square(t["log_ratio"])),
            "ratio": tok(t["ratio"]),
            "vf_clipfrac": tok(vt["clipped"]),
            "value_error": tok(vt["error"]),
        }
        if hp.kl_mode == "loss":
            kl_tok = losses.kl_penalty(
                logprobs, jax.lax.stop_gradient(b["ref_logprobs"]), estimator=hp.kl_loss_estimator
            )
            kl_loss = agg(kl_tok)
            loss = loss + kl_coef * kl_loss
            metrics["kl_loss"] = kl_loss
        if ptx is not None:
            nll_sum, _ = ptx_nll_sum(
                pspec,
                p_params,
                p_lora,
                plora,
                ptx,
                compute_dtype=compute_dtype,
                attention_impl=hp.attention_impl,
                remat=hp.remat,
            )
            ptx_loss = nll_sum / jnp.maximum(ptx_tokens, 1.0)
            loss = loss + hp.ptx_coef * ptx_loss
            metrics["ptx_loss"] = ptx_loss
        metrics["loss"] = loss
        return loss, jax.lax.stop_gradient(metrics)

    return loss_fn
