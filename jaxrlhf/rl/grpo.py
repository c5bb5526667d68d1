"""The group-baseline update of GRPO (Shao et al. 2024) and RLOO (Ahmadian et al. 2024), as TRL 1.16 has it.

``grpo_update(state, base, rollout, rng) -> (state, metrics)``, one jitted function, no critic:

1. rewards r = the rollout's ``scores`` (a row whose every reward term is NaN, i.e. every function returned
   None, is unscorable: no advantage, left out of the group statistics). RLOO: clipped to
   ``reward_clip_range``, then minus ``beta * sum_t m (log pi_old - log ref)`` (a k1 penalty in the reward);
2. advantages, one per completion, from the groups of ``num_generations`` rows of one prompt:
   ``losses.grpo_advantages`` (``scale_rewards`` group / batch / none = Dr. GRPO) or
   ``losses.rloo_advantages`` (leave-one-out baseline, optionally ``normalize_advantages``);
3. ``num_iterations`` x ``num_minibatches`` optimizer steps inside one ``lax.scan`` over epochs (a fresh
   permutation of the rows per epoch) -> scan over minibatches -> scan over ``grad_accum`` micro-batches whose
   losses and gradients add up to the minibatch's (``losses.grpo_token_terms`` + ``grpo_aggregate``: the
   aggregation of ``loss_type`` exactly as TRL divides it; GRPO adds ``beta * k3(pi, ref)`` per token, times
   the ratio with ``use_bias_correction_kl``, TRL's default), minus
   ``entropy_coef`` x the micro-batch's mean token entropy (TRL's entropy bonus).

Log-probs are :func:`jaxrlhf.rl.rollout.completion_logprobs`, the function that gave the rollout's old
log-probs, so the first ratio is 1. ``mask_truncated_completions`` drops completions without a stop token
from the loss. The frozen base (LoRA policies) is an argument apart, never donated; the state is donated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from jaxrlhf import lora as lora_lib
from jaxrlhf import losses, models, sharding
from jaxrlhf.losses._grpo import SCALE_REWARDS, importance_weights
from jaxrlhf.rl._ppo_loss import split_trainable
from jaxrlhf.train.state import opt_state_shardings

ADVANTAGES = ("grpo", "rloo")
_BATCH = (
    "prompt_ids",
    "prompt_mask",
    "tokens",
    "mask",
    "loss_mask",
    "logprobs",
    "ref_logprobs",
    "advantages",
)


@dataclasses.dataclass(frozen=True)
class GRPOHyperParams:
    """Hyper-parameters of the update (TRL's ``GRPOConfig`` / ``RLOOConfig`` names; module docstring).

    ``num_generations``: G, rows per prompt (the stages set it from ``rollout.sampling.n``);
    ``num_iterations`` epochs over the rollout, each ``num_minibatches`` optimizer steps of ``grad_accum``
    micro-batches (TRL: ``steps_per_generation = num_minibatches * gradient_accumulation_steps``).
    ``epsilon`` / ``epsilon_high``: the clip range (cispo: ``epsilon_high`` is the ratio cap); ``delta``:
    an upper cap of the unclipped ratio (two-sided clipping); ``max_completion_length``: dr_grpo's
    constant (None: the rollout's width).
    """

    advantage: str = "grpo"
    num_generations: int = 8
    scale_rewards: str = "group"
    normalize_advantages: bool = False
    reward_clip_range: tuple[float, float] | None = None
    loss_type: str = "dapo"
    beta: float = 0.0
    use_bias_correction_kl: bool = True
    epsilon: float = 0.2
    epsilon_high: float | None = None
    delta: float | None = None
    importance_sampling_level: str = "token"
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    entropy_coef: float = 0.0
    mask_truncated_completions: bool = False
    num_iterations: int = 1
    num_minibatches: int = 1
    grad_accum: int = 1
    max_completion_length: int | None = None
    temperature: float = 1.0
    compute_dtype: str | None = None
    attention_impl: str = "plain"
    remat: str = "none"  # the update's forward: none / full / save_dots (the stages set model.remat)

    def __post_init__(self):
        scale = {True: "group", False: "none"}.get(self.scale_rewards, self.scale_rewards)
        object.__setattr__(self, "scale_rewards", scale)
        if self.reward_clip_range is not None:
            object.__setattr__(self, "reward_clip_range", tuple(float(x) for x in self.reward_clip_range))

        def need(ok: bool, what: str):
            if not ok:
                raise ValueError(f"GRPOHyperParams: {what}")

        need(self.advantage in ADVANTAGES, f"advantage must be one of {ADVANTAGES}, got {self.advantage!r}")
        need(self.loss_type in losses.GRPO_LOSS_TYPES,
             f"loss_type must be one of {losses.GRPO_LOSS_TYPES}, got {self.loss_type!r}")  # fmt: skip
        need(scale in SCALE_REWARDS, f"scale_rewards must be group / batch / none, got {scale!r}")
        need(self.num_generations >= 2, f"num_generations must be >= 2 (a group), got {self.num_generations}")
        need(min(self.num_iterations, self.num_minibatches, self.grad_accum) >= 1,
             "num_iterations, num_minibatches and grad_accum must be >= 1")  # fmt: skip
        need(
            self.importance_sampling_level in ("token", "sequence"),
            "importance_sampling_level: token|sequence",
        )
        need(self.beta >= 0, f"beta must be >= 0, got {self.beta}")
        need(self.remat in ("none", "full", "save_dots"), f"remat: none|full|save_dots, not {self.remat!r}")
        need(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        need(
            self.reward_clip_range is None or len(self.reward_clip_range) == 2,
            "reward_clip_range: [min, max]",
        )
        need(not (self.loss_type == "rloo" and self.advantage == "grpo" and self.beta > 0),
             "loss_type=rloo takes its KL in the reward: use advantage=rloo with beta")  # fmt: skip

    @property
    def kl_in_loss(self) -> bool:
        """GRPO: ``beta * k3`` per token in the loss; RLOO: ``beta * k1`` per sequence in the reward."""
        return self.beta > 0 and self.advantage == "grpo"

    @property
    def rows_divisor(self) -> int:
        return self.num_minibatches * self.grad_accum


@dataclasses.dataclass(frozen=True)
class RLOOHyperParams(GRPOHyperParams):
    """:class:`GRPOHyperParams` with TRL ``RLOOConfig``'s defaults: leave-one-out advantages, the
    sequence-level ``rloo`` loss, ``beta = 0.05`` (a k1 penalty in the reward), two samples per prompt."""

    advantage: str = "rloo"
    loss_type: str = "rloo"
    beta: float = 0.05
    num_generations: int = 2


class GRPOState(NamedTuple):
    step: jax.Array  # int32 []: optimizer steps
    iteration: jax.Array  # int32 []: updates (one per rollout)
    policy: Any  # full params, or LoRA adapters over the frozen base
    opt: Any
    rng: jax.Array  # uint32 [2]


def _valid_rows(rollout: Any) -> jax.Array:
    terms = rollout.reward_terms
    if terms.shape[1] == 0:
        return jnp.ones(rollout.scores.shape, bool)
    return ~jnp.all(jnp.isnan(terms), axis=1)


def group_advantages(rollout: Any, hp: GRPOHyperParams) -> tuple[jax.Array, dict]:
    """Steps 1-2 of the module docstring: ``(advantages [R], metrics)``."""
    valid = _valid_rows(rollout)
    mask = rollout.mask.astype(jnp.float32)
    scores = rollout.scores.astype(jnp.float32)
    rewards = scores
    seq_kl = jnp.sum((rollout.logprobs - rollout.ref_logprobs) * mask, axis=1)
    g = hp.num_generations
    if hp.advantage == "rloo":
        if hp.reward_clip_range is not None:
            rewards = jnp.clip(rewards, *hp.reward_clip_range)
        if hp.beta > 0:
            rewards = rewards - hp.beta * seq_kl
        adv = losses.rloo_advantages(rewards, g, normalize=hp.normalize_advantages, valid=valid)
    else:
        adv = losses.grpo_advantages(rewards, g, scale=hp.scale_rewards, valid=valid)
    std = losses.group_reward_std(rewards, g, valid=valid)
    vf = valid.astype(jnp.float32)
    n_valid = jnp.maximum(jnp.sum(vf), 1.0)
    mean = jnp.sum(scores * vf) / n_valid
    metrics = {
        "reward_mean": mean,
        "reward_std": jnp.sqrt(jnp.sum(jnp.square(scores - mean) * vf) / jnp.maximum(n_valid - 1.0, 1.0)),
        "group_reward_std": jnp.nanmean(std),
        "frac_reward_zero_std": jnp.mean((jnp.abs(std) <= 1e-8).astype(jnp.float32)),
        "unscorable_fraction": 1.0 - jnp.mean(vf),
        "advantage_mean": jnp.mean(adv),
        "advantage_std": jnp.std(adv),
        "kl_ref": jnp.mean(seq_kl),
        "completion_length": jnp.mean(jnp.sum(mask, axis=1)),
    }
    return adv, metrics


def make_grpo_loss(spec: Any, hp: GRPOHyperParams, lora_config: Any = None) -> Callable:
    """``loss_fn(policy, base, batch, norms, rng) -> (loss, metrics)`` of one micro-batch (dict of
    ``_BATCH`` keys); ``norms``: ``{"tokens", "seqs"}`` of its minibatch (metric shares add up) and
    ``"dapo"`` (the DAPO family's token normaliser)."""
    from jaxrlhf.rl.rollout import completion_logprobs

    compute_dtype = None if hp.compute_dtype is None else jnp.dtype(hp.compute_dtype)
    fwd = dict(
        temperature=hp.temperature, compute_dtype=compute_dtype, attention_impl=hp.attention_impl,
        remat=hp.remat,
    )  # fmt: skip
    terms_kw = dict(
        loss_type=hp.loss_type, clip_eps=hp.epsilon, clip_eps_high=hp.epsilon_high, delta=hp.delta,
        importance_sampling_level=hp.importance_sampling_level,
        sapo_temperature_pos=hp.sapo_temperature_pos, sapo_temperature_neg=hp.sapo_temperature_neg,
    )  # fmt: skip
    k = hp.grad_accum

    def loss_fn(policy, base, b, norms, rng):
        params, lora = split_trainable(lora_config, policy, base)
        drop = rng if lora_config is not None and lora_config.dropout > 0 else None
        lp, ent = completion_logprobs(
            spec, params, b["prompt_ids"], b["prompt_mask"], b["tokens"], b["mask"], lora=lora,
            lora_config=lora_config, return_entropy=True, dropout_rng=drop, **fwd,
        )  # fmt: skip
        m = b["loss_mask"]
        per_token, t = losses.grpo_token_terms(lp, b["logprobs"], b["advantages"], m, **terms_kw)
        kl = jnp.zeros_like(m)
        if hp.kl_in_loss:
            kl = losses.kl_penalty(lp, jax.lax.stop_gradient(b["ref_logprobs"]), estimator="k3")
            if hp.use_bias_correction_kl:
                kl = kl * importance_weights(lp, b["logprobs"], m, level=hp.importance_sampling_level)
            per_token = per_token + hp.beta * kl
        pg = losses.grpo_aggregate(
            per_token, m, loss_type=hp.loss_type, micro_batches=k,
            max_completion_length=hp.max_completion_length, token_normalizer=norms["dapo"],
        )  # fmt: skip
        loss = pg
        if hp.entropy_coef:
            loss = loss - hp.entropy_coef * jnp.sum(ent * m) / jnp.maximum(jnp.sum(m), 1.0) / k
        per_seq = t["ratio"].shape[1] == 1

        def share(x):  # this micro-batch's share of the minibatch's token (or sequence) mean
            if per_seq:
                return jnp.sum(x) / norms["seqs"]
            return jnp.sum(x * m) / jnp.maximum(norms["tokens"], 1.0)

        tok = lambda x: jnp.sum(x * m) / jnp.maximum(norms["tokens"], 1.0)  # noqa: E731
        log_ratio = lp - b["logprobs"]
        metrics = {
            "policy_loss": pg,
            "loss": loss,
            "entropy": tok(ent),
            "kl": tok(kl),
            "clipfrac": share(jnp.maximum(t["low_clipped"], t["high_clipped"])),
            "clip_ratio_low": share(t["low_clipped"]),
            "clip_ratio_high": share(t["high_clipped"]),
            "ratio": share(t["ratio"]),
            "approx_kl": tok(0.5 * jnp.square(log_ratio)),
        }
        return loss, jax.lax.stop_gradient(metrics)

    return loss_fn


def make_grpo_update(
    spec: Any, hp: GRPOHyperParams, *, optimizer: optax.GradientTransformation, lora_config: Any = None
) -> Callable[..., tuple[GRPOState, dict]]:
    """The pure ``grpo_update(state, base, rollout, rng) -> (state, metrics)`` (module docstring).

    ``base``: the frozen params of a LoRA policy (None for a full one); ``rollout``: an
    ``rl.rollout.Rollout`` whose R rows divide by ``num_generations`` and ``num_minibatches * grad_accum``.
    Jit it with :func:`jit_grpo_update`.
    """
    grad_fn = jax.value_and_grad(make_grpo_loss(spec, hp, lora_config), has_aux=True)
    n_mb, n_acc = hp.num_minibatches, hp.grad_accum

    def split_rows(x):
        return x.reshape(n_mb, n_acc, x.shape[0] // (n_mb * n_acc), *x.shape[1:])

    def update(state: GRPOState, base: Any, rollout: Any, rng: jax.Array):
        rows = rollout.tokens.shape[0]
        if rows % hp.num_generations or rows % (n_mb * n_acc):
            raise ValueError(
                f"grpo_update: {rows} rollout rows must divide by num_generations = {hp.num_generations} "
                f"and by num_minibatches * grad_accum = {n_mb} * {n_acc}"
            )
        adv, pre = group_advantages(rollout, hp)
        mask = rollout.mask.astype(jnp.float32)
        loss_mask = mask * rollout.ended[:, None] if hp.mask_truncated_completions else mask
        data = {k: getattr(rollout, k) for k in _BATCH if hasattr(rollout, k)}
        data.update(mask=mask, loss_mask=loss_mask, advantages=adv)
        dapo = jnp.maximum(jnp.sum(loss_mask), 1.0) / n_mb
        rng_next, dropout_key = jax.random.split(state.rng)

        def minibatch(carry, mb):
            policy, opt, step = carry
            norms = {"tokens": jnp.sum(mb["loss_mask"]), "seqs": jnp.float32(rows // n_mb), "dapo": dapo}

            def micro(acc, ys):
                i, batch = ys
                batch = {
                    k: sharding.constrain(v, ("batch",) + (None,) * (v.ndim - 1)) for k, v in batch.items()
                }
                key = jax.random.fold_in(dropout_key, step * n_acc + i)
                (_, m), g = grad_fn(policy, base, batch, norms, key)
                return jax.tree.map(lambda a, x: a + x.astype(jnp.float32), acc, g), m

            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), policy)
            grads, per_micro = jax.lax.scan(micro, zeros, (jnp.arange(n_acc), mb))
            m = jax.tree.map(lambda x: jnp.sum(x, axis=0), per_micro)  # shares add up to the minibatch's
            grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, policy)
            upd, opt = optimizer.update(grads, opt, policy)
            policy = optax.apply_updates(policy, upd)
            return (policy, opt, step + 1), {**m, "grad_norm": optax.tree.norm(grads)}

        def epoch(carry, key):
            perm = jax.random.permutation(key, rows)
            shuffled = {k: split_rows(jnp.take(v, perm, axis=0)) for k, v in data.items()}
            return jax.lax.scan(minibatch, carry, shuffled)

        carry = (state.policy, state.opt, state.step)
        (policy, opt, step), per_mb = jax.lax.scan(epoch, carry, jax.random.split(rng, hp.num_iterations))
        metrics = {k: jnp.mean(v) for k, v in per_mb.items()}
        metrics.update(pre)
        metrics["ratio_first"] = per_mb["ratio"][0, 0]
        metrics["approx_kl_first"] = per_mb["approx_kl"][0, 0]
        return GRPOState(step, state.iteration + 1, policy, opt, rng_next), metrics

    return update


def policy_axes(spec: Any, lora_config: Any, policy: Any) -> Any:
    axes = models.param_axes(spec)
    return axes if lora_config is None else lora_lib.param_axes(axes, policy)


def grpo_state_shardings(spec: Any, lora_config: Any, state: GRPOState, mesh: Mesh) -> GRPOState:
    """Shardings of ``state`` (arrays or ShapeDtypeStructs): params by logical axes, moments like them."""
    rep = sharding.replicated(mesh)
    p_sh = sharding.named_shardings(policy_axes(spec, lora_config, state.policy), mesh, state.policy)
    return GRPOState(rep, rep, p_sh, opt_state_shardings(state.opt, state.policy, p_sh, mesh), rep)


def init_grpo_state(
    spec: Any,
    policy: Any,
    *,
    optimizer: optax.GradientTransformation,
    rng: Any,
    lora_config: Any = None,
    mesh: Mesh | None = None,
) -> tuple[GRPOState, GRPOState | None]:
    """``(state, shardings)`` with a fresh optimizer state (created sharded with ``mesh``; shardings None
    without). The state may share buffers with ``policy``: the update donates it, so pass a copy if you keep
    ``policy`` (e.g. as the reference)."""
    from jaxrlhf.rl._ppo_state import _raw_key

    key = _raw_key(rng)

    def build(p):
        z = jnp.zeros((), jnp.int32)
        return GRPOState(z, z, p, optimizer.init(p), key)

    if mesh is None:
        return jax.jit(build)(policy), None
    shard = grpo_state_shardings(spec, lora_config, jax.eval_shape(build, policy), mesh)
    return jax.jit(build, out_shardings=shard)(policy), shard


def grpo_rollout_models(spec: Any, state: GRPOState, base: Any, *, lora_config: Any = None, ref: Any = None,
                        no_ref: bool = False):  # fmt: skip
    """``rl.rollout.RolloutModels`` of the state: the policy actor, no critic (zero values); ``ref``: an
    ``Actor`` of frozen params (full policies), None with a LoRA policy = its base without adapters."""
    from jaxrlhf.rl import rollout as rollout_lib

    actor = (
        rollout_lib.Actor(spec, state.policy)
        if lora_config is None
        else rollout_lib.Actor(spec, base, state.policy, lora_config)
    )
    return rollout_lib.RolloutModels(actor, ref=ref, critic=None, no_ref=no_ref)


def jit_grpo_update(
    update: Callable,
    *,
    mesh: Mesh | None = None,
    state_shardings: GRPOState | None = None,
    base_shardings: Any = None,
) -> Callable:
    """``jax.jit(update, donate_argnums=(0,))``; with ``mesh``: explicit in/out shardings (state as given,
    base by ``base_shardings`` or replicated, rollout rows over ``batch``), run under the mesh."""
    if mesh is None:
        return jax.jit(update, donate_argnums=(0,))
    if state_shardings is None:
        raise ValueError("jit_grpo_update(mesh=...) needs state_shardings (rl.grpo_state_shardings)")
    from jaxrlhf.rl.ppo import _batch_shardings

    rep = sharding.replicated(mesh)
    cache: dict = {}

    def call(state, base, rollout, rng):
        key = jax.tree.structure(rollout), tuple(jnp.shape(x) for x in jax.tree.leaves(rollout))
        if key not in cache:
            b_sh = base_shardings if base_shardings is not None else jax.tree.map(lambda _: rep, base)
            r_sh = _batch_shardings(rollout, mesh)
            jitted = jax.jit(
                update,
                in_shardings=(state_shardings, b_sh, r_sh, rep),
                out_shardings=(state_shardings, rep),
                donate_argnums=(0,),
            )
            cache[key] = (jitted, r_sh)
        jitted, r_sh = cache[key]
        with sharding.use_mesh(mesh):
            return jitted(state, base, jax.device_put(rollout, r_sh), rng)

    call.cache = cache
    return call
