"""The PPO update (Schulman et al. 2017) for language models, as in InstructGPT / DeepSpeed-Chat / TRL.

``ppo_update(state, frozen, rollout, rng, ptx=None) -> (state, metrics)``, one jitted function:

1. per-token rewards from the rollout (``losses.token_rewards``): the sequence score (already normalised
   by the rollout with the running statistics, optionally clipped again by ``score_clip``) at the last valid
   token, and ``-kl_coef * kl_t`` with ``kl_t = kl_estimator(pi_old, ref)`` when ``kl_mode="reward"``;
2. GAE (``losses.gae``) on the rollout's values: advantages A and returns R = A + V_old; A whitened over the
   rollout's valid tokens (``masked_whiten``, keeping the mean when ``advantage_keep_mean``);
3. ``epochs`` x ``num_minibatches`` optimizer steps inside one ``lax.scan`` over epochs (a fresh permutation
   of the rows per epoch from ``rng``) -> scan over minibatches -> scan over ``grad_accum`` micro-batches
   (the loss of ``rl._ppo_loss``; gradients summed exactly). Policy and critic have their own optimizers;
   during the first ``critic_warmup_iterations`` updates the policy (and its optimizer state and EMA) are
   left unchanged. The EMA of the policy, when enabled, follows every optimizer step;
4. the KL controller sees the rollout's mean sequence KL ``mean_b sum_t m (log pi_old - log ref)`` over
   R samples; the running reward statistics absorb the rollout's raw reward-model scores (the next
   rollout's ``rm_stats``, see :func:`rm_stats`).

The frozen bases are an argument apart, never donated; the state is donated.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from jaxrlhf import losses, sharding
from jaxrlhf.rl._ema import ema as make_ema
from jaxrlhf.rl._ppo_config import PPOHyperParams, PPOModels
from jaxrlhf.rl._ppo_loss import BATCH_KEYS, make_ppo_loss
from jaxrlhf.rl._ppo_state import PPOFrozen, PPOState

UpdateFn = Callable[..., tuple[PPOState, dict]]


def kl_controller(hp: PPOHyperParams) -> losses.KLController:
    """Adaptive (``kl_target``, ``kl_horizon``) or fixed KL coefficient controller, from ``init_kl_coef``."""
    if hp.kl_target is None:
        return losses.fixed_kl_controller(hp.init_kl_coef)
    return losses.adaptive_kl_controller(hp.init_kl_coef, target=hp.kl_target, horizon=hp.kl_horizon)


def ppo_advantages(rollout: Any, kl_coef: jax.Array, hp: PPOHyperParams) -> tuple[dict, dict]:
    """Steps 1-2 of the module docstring: ``({"rewards", "advantages", "returns"} [R, N], metrics)``."""
    mask = rollout.mask.astype(jnp.float32)
    logp, ref = rollout.logprobs, rollout.ref_logprobs
    seq_kl = losses.masked_sum(losses.kl_penalty(logp, ref, estimator="k1"), mask, axis=1)  # [R]
    scores = losses.clip_rewards(rollout.scores.astype(jnp.float32), clip=hp.score_clip)
    if hp.kl_mode == "reward":
        kl_tok, coef = losses.kl_penalty(logp, ref, estimator=hp.kl_estimator), kl_coef
    else:
        kl_tok, coef = jnp.zeros_like(mask), 0.0
    rewards = losses.token_rewards(scores, kl_tok, mask, kl_coef=coef)
    adv, ret = losses.gae(rewards, rollout.values, mask, gamma=hp.gamma, lam=hp.lam)
    white = adv
    if hp.whiten_advantages:
        white = losses.masked_whiten(adv, mask, shift_mean=not hp.advantage_keep_mean)
    values = rollout.values.astype(jnp.float32)
    ret_var = losses.masked_var(ret, mask)
    explained = 1.0 - losses.masked_var(ret - values, mask) / ret_var
    raw = getattr(rollout, "raw_scores", None)
    raw = rollout.scores if raw is None else raw
    metrics = {
        "kl_ref": jnp.mean(seq_kl),
        "kl_coef": jnp.asarray(kl_coef, jnp.float32),
        "score_mean": jnp.mean(scores),
        "score_std": jnp.std(scores),
        "score_raw_mean": jnp.mean(raw.astype(jnp.float32)),
        "score_raw_std": jnp.std(raw.astype(jnp.float32)),
        "reward_total_mean": jnp.mean(jnp.sum(rewards * mask, axis=1)),
        "advantage_mean": losses.masked_mean(adv, mask),
        "advantage_std": jnp.sqrt(losses.masked_var(adv, mask)),
        "return_mean": losses.masked_mean(ret, mask),
        "value_mean_rollout": losses.masked_mean(values, mask),
        "explained_variance": jnp.where(ret_var > 0, explained, 0.0),
        "length_mean": jnp.mean(jnp.sum(mask, axis=1)),
    }
    return {"rewards": rewards, "advantages": white, "returns": ret}, metrics


def _ptx_tokens(ptx: dict, encoder_decoder: bool) -> jax.Array:
    m = ptx["loss_mask"].astype(jnp.float32)
    return jnp.sum(m if encoder_decoder else m[..., 1:], axis=tuple(range(2, m.ndim)))


def _where_tree(c: jax.Array, new: Any, old: Any) -> Any:
    return jax.tree.map(lambda a, b: jnp.where(c, a, b), new, old)


def make_ppo_update(
    ppo_models: PPOModels,
    hp: PPOHyperParams,
    *,
    policy_optimizer: optax.GradientTransformation,
    critic_optimizer: optax.GradientTransformation,
) -> UpdateFn:
    """The pure ``ppo_update(state, frozen, rollout, rng, ptx=None) -> (state, metrics)`` (module docstring).

    ``rollout``: an ``rl.rollout.Rollout`` (R rows, R divisible by num_minibatches * grad_accum); ``rng``: a
    key for the shuffles; ``ptx``: an SFT-style pretraining batch whose rows divide the same way (used when
    ``hp.ptx_coef > 0``). Jit it with :func:`jit_ppo_update`.
    """
    loss_fn = make_ppo_loss(ppo_models, hp)
    grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)
    ema_fn = None if hp.ema_decay is None else make_ema(hp.ema_decay)
    ctl = kl_controller(hp)
    e_d = ppo_models.policy_spec.is_encoder_decoder
    n_mb, n_acc = hp.num_minibatches, hp.grad_accum

    def split_rows(x: jax.Array, what: str) -> jax.Array:
        rows = x.shape[0]
        if rows % (n_mb * n_acc):
            raise ValueError(
                f"ppo_update: {what} has {rows} rows, not divisible by num_minibatches * grad_accum = "
                f"{n_mb} * {n_acc}"
            )
        return x.reshape(n_mb, n_acc, rows // (n_mb * n_acc), *x.shape[1:])

    def update(state: PPOState, frozen: PPOFrozen, rollout: Any, rng: jax.Array, ptx: dict | None = None):
        use_ptx = ptx is not None and hp.ptx_coef > 0
        kl_coef = state.kl.kl_coef
        adv, pre = ppo_advantages(rollout, kl_coef, hp)
        data = {k: getattr(rollout, k) for k in BATCH_KEYS if hasattr(rollout, k)}
        data.update(advantages=adv["advantages"], returns=adv["returns"])
        data["mask"] = data["mask"].astype(jnp.float32)
        rows = data["tokens"].shape[0]
        split_rows(data["tokens"], "the rollout")
        ptx_mb = jax.tree.map(lambda x: split_rows(x, "the ptx batch"), ptx) if use_ptx else None
        ptx_tokens = jnp.sum(_ptx_tokens(ptx_mb, e_d), axis=1) if use_ptx else jnp.zeros((n_mb,))
        train_policy = state.iteration >= hp.critic_warmup_iterations
        rng_next, dropout_key = jax.random.split(state.rng)

        def minibatch(carry, xs):
            policy, critic, p_opt, c_opt, ema, step = carry
            mb, ptx_one, ptx_tok = xs
            n_seq = mb["mask"].shape[0] * mb["mask"].shape[1]  # [grad_accum, rows, N]
            denominators = {"tokens": jnp.sum(mb["mask"]), "seqs": jnp.float32(n_seq)}

            def micro(acc, ys):
                i, batch, ptx_micro = ys
                batch = {
                    k: sharding.constrain(v, ("batch",) + (None,) * (v.ndim - 1)) for k, v in batch.items()
                }
                key = jax.random.fold_in(dropout_key, step * n_acc + i)
                args = (frozen, batch, denominators, kl_coef, ptx_micro, ptx_tok, key)
                (_, m), grads = grad_fn(policy, critic, *args)
                acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc, grads)
                return acc, m

            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), (policy, critic))
            (g_p, g_c), per_micro = jax.lax.scan(micro, zeros, (jnp.arange(n_acc), mb, ptx_one))
            m = jax.tree.map(lambda x: jnp.sum(x, axis=0), per_micro)  # shares of the minibatch means
            g_p = jax.tree.map(lambda g, p: g.astype(p.dtype), g_p, policy)
            g_c = jax.tree.map(lambda g, p: g.astype(p.dtype), g_c, critic)
            up, p_opt_new = policy_optimizer.update(g_p, p_opt, policy)
            uc, c_opt = critic_optimizer.update(g_c, c_opt, critic)
            policy_new = optax.apply_updates(policy, up)
            policy = _where_tree(train_policy, policy_new, policy)
            p_opt = _where_tree(train_policy, p_opt_new, p_opt)
            critic = optax.apply_updates(critic, uc)
            if ema is not None:
                ema = _where_tree(train_policy, ema_fn.update(ema, policy), ema)
            m = {**m, "policy_grad_norm": optax.tree.norm(g_p), "critic_grad_norm": optax.tree.norm(g_c)}
            return (policy, critic, p_opt, c_opt, ema, step + 1), m

        def epoch(carry, key):
            perm = jax.random.permutation(key, rows)
            shuffled = {k: split_rows(jnp.take(v, perm, axis=0), "the rollout") for k, v in data.items()}
            return jax.lax.scan(minibatch, carry, (shuffled, ptx_mb, ptx_tokens))

        carry = (state.policy, state.critic, state.policy_opt, state.critic_opt, state.ema, state.step)
        carry, per_mb = jax.lax.scan(epoch, carry, jax.random.split(rng, hp.epochs))
        policy, critic, p_opt, c_opt, ema, step = carry
        kl_state = ctl.update(state.kl, pre["kl_ref"], rows)
        reward_norm = state.reward_norm
        raw = getattr(rollout, "raw_scores", None)
        if hp.update_reward_norm and raw is not None:
            reward_norm = losses.running_reward_normalizer().update(reward_norm, raw)
        metrics = {k: jnp.mean(v) for k, v in per_mb.items()}
        metrics.update(pre)
        metrics["ratio_first"] = per_mb["ratio"][0, 0]
        metrics["approx_kl_first"] = per_mb["approx_kl"][0, 0]
        metrics["kl_coef_next"] = kl_state.kl_coef
        metrics["policy_updated"] = train_policy.astype(jnp.float32)
        new_state = PPOState(
            step=step,
            iteration=state.iteration + 1,
            policy=policy,
            critic=critic,
            policy_opt=p_opt,
            critic_opt=c_opt,
            kl=kl_state,
            reward_norm=reward_norm,
            ema=ema,
            rng=rng_next,
        )
        return new_state, metrics

    return update


def rollout_models(
    ppo_models: PPOModels, state: PPOState, frozen: PPOFrozen, *, ref: Any = None, no_ref=False
):
    """The ``rl.rollout.RolloutModels`` of the current state: policy and critic actors over their bases.

    ``ref``: an ``rl.rollout.Actor`` of frozen reference params (full-parameter policies); None with a LoRA
    policy means the policy's base without adapters (no copy).
    """
    from jaxrlhf.rl import rollout as rollout_lib

    pm = ppo_models
    pol = (pm.policy_spec, state.policy, None, None) if pm.policy_lora is None else (
        pm.policy_spec, frozen.policy_base, state.policy, pm.policy_lora)  # fmt: skip
    bb = state.critic["backbone"]
    cri = (pm.critic_spec, bb, state.critic["head"], None, None) if pm.critic_lora is None else (
        pm.critic_spec, frozen.critic_base, state.critic["head"], bb, pm.critic_lora)  # fmt: skip
    return rollout_lib.RolloutModels(
        rollout_lib.Actor(*pol), ref=ref, critic=rollout_lib.Critic(*cri), no_ref=no_ref
    )


def export_policy(state: PPOState) -> Any:
    """The policy tree to export: the EMA when enabled (DeepSpeed-Chat), else the trained params/adapters."""
    return state.policy if state.ema is None else state.ema.params


def _batch_shardings(tree: Any, mesh: Mesh) -> Any:
    def one(x):
        names = ("batch",) + (None,) * (x.ndim - 1)
        return NamedSharding(mesh, sharding.logical_to_spec(names, mesh, x.shape))

    return jax.tree.map(one, tree)


def jit_ppo_update(
    update: UpdateFn,
    *,
    mesh: Mesh | None = None,
    state_shardings: PPOState | None = None,
    frozen_shardings: PPOFrozen | None = None,
) -> UpdateFn:
    """``jax.jit(update, donate_argnums=(0,))``: the state is donated; frozen, rollout, rng, ptx are not.

    With ``mesh``: explicit ``in_shardings`` (state / frozen as given, e.g. by ``ppo_state_shardings`` and
    ``frozen_shardings``; rollout and ptx rows over the ``batch`` axis; rng replicated) and
    ``out_shardings`` (the state's, metrics replicated); traced and run under ``sharding.use_mesh(mesh)``.
    One compilation per rollout shape.
    """
    if mesh is None:
        return jax.jit(update, donate_argnums=(0,))
    if state_shardings is None:
        raise ValueError("jit_ppo_update(mesh=...) needs state_shardings (rl.ppo_state_shardings)")
    rep = sharding.replicated(mesh)
    cache: dict = {}

    def call(state, frozen, rollout, rng, ptx=None):
        key = jax.tree.structure((rollout, ptx)), tuple(jnp.shape(x) for x in jax.tree.leaves((rollout, ptx)))
        if key not in cache:
            ptx_sh = None if ptx is None else _batch_shardings(ptx, mesh)
            f_sh = frozen_shardings if frozen_shardings is not None else jax.tree.map(lambda _: rep, frozen)
            r_sh = _batch_shardings(rollout, mesh)
            jitted = jax.jit(
                update,
                in_shardings=(state_shardings, f_sh, r_sh, rep, ptx_sh),
                out_shardings=(state_shardings, rep),
                donate_argnums=(0,),
            )
            cache[key] = (jitted, r_sh, ptx_sh)
        jitted, r_sh, ptx_sh = cache[key]
        # rows arrive sharded however the rollout left them (a replicated per-row score, ...): place them
        rollout = jax.device_put(rollout, r_sh)
        if ptx is not None:
            ptx = jax.device_put(ptx, ptx_sh)
        with sharding.use_mesh(mesh):
            return jitted(state, frozen, rollout, rng, ptx)

    call.cache = cache  # (jitted, rollout shardings, ptx shardings) per rollout shape (tests count them)
    return call
