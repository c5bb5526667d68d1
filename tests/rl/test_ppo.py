"""rl.ppo: the first ratio of a rollout is 1, one compiled nested scan with a donated state and a frozen base
that survives, the 1-epoch x 1-minibatch update equals a hand-written jax.grad + optax step, gradient
accumulation is exact, critic warm-up and the EMA inside the update."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrlhf import losses, rl, train
from jaxrlhf.models import heads
from tests._jaxpr import all_eqns
from tests.rl import _ppo_setup as S
from tests.rl import _tiny

ADAMW = train.make_optimizer(train.OptimConfig(lr=1e-3, schedule="constant", clip_norm=1.0))
# eps 1e-4: Adam's g / (|g| + eps) is ill-conditioned for the ~1e-9 gradients of unseen embedding rows
ADAMW_REF = train.make_optimizer(train.OptimConfig(lr=1e-3, schedule="constant", clip_norm=1.0, eps=1e-4))
SGD = train.make_optimizer(train.OptimConfig(name="sgd", lr=0.05, schedule="constant", clip_norm=None))


def _init(ppo_models, hp, policy, critic, p_opt=ADAMW, c_opt=ADAMW):
    state, _ = rl.init_ppo_state(
        ppo_models, hp, S.copy(policy), S.copy(critic), policy_optimizer=p_opt, critic_optimizer=c_opt, rng=0,
        reward_stats={"mean": 1.0, "std": 2.0}, reward_stats_count=8.0,
    )  # fmt: skip
    return state


def test_first_ratio_is_one_in_one_compiled_scan_with_donated_state():
    ppo_models, frozen, policy, critic = S.lora_setup()
    hp = rl.PPOHyperParams(epochs=2, num_minibatches=2, grad_accum=2, kl_target=6.0)
    state = _init(ppo_models, hp, policy, critic)
    rollout = S.real_rollout(ppo_models, state, frozen)  # helper rollout's rl.rollout
    update = rl.make_ppo_update(ppo_models, hp, policy_optimizer=ADAMW, critic_optimizer=ADAMW)
    traces = []
    jitted = rl.jit_ppo_update(lambda *a: (traces.append(1), update(*a))[1])

    jaxpr = jax.make_jaxpr(update)(state, frozen, rollout, jax.random.PRNGKey(1)).jaxpr
    scans = [e for e in all_eqns(jaxpr) if e.primitive.name == "scan"]
    lengths = sorted({e.params["length"] for e in scans})
    assert {hp.epochs, hp.num_minibatches, hp.grad_accum} <= set(lengths), lengths  # epochs > mb > micro

    old_leaf = jax.tree.leaves(state.policy)[0]
    new, m = jitted(state, frozen, rollout, jax.random.PRNGKey(1))
    # the rollout's old log-probs are reproduced by the update's forward: ratio 1, approx-KL 0
    assert abs(float(m["ratio_first"]) - 1.0) <= 1e-5
    assert 0.0 <= float(m["approx_kl_first"]) <= 1e-5
    assert all(np.isfinite(float(v)) for v in m.values())
    assert int(new.step) == hp.epochs * hp.num_minibatches and int(new.iteration) == 1
    assert old_leaf.is_deleted()  # the state is donated ...
    assert not any(x.is_deleted() for x in jax.tree.leaves(frozen))  # ... the frozen base is not
    assert not any(x.is_deleted() for x in jax.tree.leaves(rollout))
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), new.policy, policy)
    assert max(jax.tree.leaves(moved)) > 0
    # the adaptive controller saw the rollout's sequence KL (TRL's update rule), the stats its raw scores
    np.testing.assert_allclose(
        m["kl_coef_next"], 0.05 * (1 + np.clip(float(m["kl_ref"]) / 6.0 - 1, -0.2, 0.2) * 8 / 1e4), rtol=1e-6
    )
    seen = np.asarray(rollout.raw_scores, np.float64)  # the reward model's un-normalised scores
    np.testing.assert_allclose(new.reward_norm.mean, (8 * 1.0 + seen.sum()) / 16, rtol=1e-5)
    # the rollout normalised them with the seed statistics (mean 1, std 2) handed over by rl.rm_stats
    np.testing.assert_allclose(rollout.scores, (seen - 1.0) / 2.0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rl.rm_stats(new)[0], new.reward_norm.mean)

    new2, m2 = jitted(new, frozen, rollout, jax.random.PRNGKey(2))  # a second iteration: no new compile
    assert len(traces) == 1 and int(new2.iteration) == 2
    assert float(m2["approx_kl_first"]) > 1e-5  # the policy has moved away from the sampling policy


def _reference_update(ppo_models, hp, state, frozen, rollout, p_opt, c_opt):
    """The documented loss on the whole rollout, plain jax.grad, one optax step per optimizer (jitted as a
    whole: one compilation instead of op-by-op dispatch)."""
    coef = jnp.float32(state.kl.kl_coef)

    @jax.jit
    def run(policy, critic, rollout, coef):
        mask = rollout.mask
        kl = losses.kl_penalty(rollout.logprobs, rollout.ref_logprobs, estimator="k1")
        rewards = losses.token_rewards(rollout.scores, kl, mask, kl_coef=coef)
        adv, ret = losses.gae(rewards, rollout.values, mask, gamma=hp.gamma, lam=hp.lam)
        adv = losses.masked_whiten(adv, mask)
        inputs = (rollout.prompt_ids, rollout.prompt_mask, rollout.tokens, rollout.mask)
        spec = ppo_models.policy_spec

        def loss_fn(policy, critic):
            lp, ent = S.logprobs_jit(spec, policy, *inputs, return_entropy=True)
            _, hid = S.logprobs_jit(ppo_models.critic_spec, critic["backbone"], *inputs, return_hidden=True)
            values = heads.token_values(critic["head"], hid)
            agg = dict(loss_agg=hp.loss_agg)
            pg, pm = losses.ppo_policy_loss(
                lp, rollout.logprobs, adv, mask, clip_eps=hp.clip_eps, dual_clip=hp.dual_clip, **agg
            )
            vf, _ = losses.ppo_value_loss(
                values, rollout.values, ret, mask, clip_eps=hp.value_clip_eps, **agg
            )
            ent_mean = losses.aggregate_loss(ent, mask, **agg)
            return pg - hp.ent_coef * ent_mean + hp.vf_coef * vf, {"policy_loss": pg, "value_loss": vf, **pm}

        (_, metrics), (gp, gc) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(policy, critic)
        up, _ = p_opt.update(gp, p_opt.init(policy), policy)
        uc, _ = c_opt.update(gc, c_opt.init(critic), critic)
        metrics["advantage_mean"] = losses.masked_mean(
            losses.gae(rewards, rollout.values, mask, gamma=hp.gamma, lam=hp.lam)[0], mask
        )
        return optax.apply_updates(policy, up), optax.apply_updates(critic, uc), metrics

    return run(state.policy, state.critic, rollout, coef)


@pytest.fixture(scope="module")
def full_setup():
    """Full-parameter policy; critic = a separate backbone + value head (InstructGPT); reference = copy."""
    spec = _tiny.SPECS["llama"]
    ppo_models = rl.PPOModels(spec, spec)
    policy = _tiny.params("llama")
    critic = {"backbone": _tiny.params("llama", seed=1), "head": _tiny.head("llama", 3)}
    hp = rl.PPOHyperParams(epochs=1, num_minibatches=1, dual_clip=2.0, ent_coef=0.01, vf_coef=0.5, lam=0.9)
    state = _init(ppo_models, hp, policy, critic, ADAMW_REF, SGD)
    rollout = S.make_rollout(ppo_models, state, rl.PPOFrozen(), policy, temperature=1.0)
    # a reference away from the policy (so the KL term matters): perturbed log-probs
    # unequal lengths (so sequence and token means differ): the tiny model rarely samples its EOS
    keep = jnp.asarray(np.arange(rollout.mask.shape[1]) < np.array([8, 3, 5, 1, 8, 6, 2, 7])[:, None])
    mask = rollout.mask * keep
    ref = rollout.ref_logprobs - 0.3 * np.random.default_rng(5).random(mask.shape)
    cut = lambda x: jnp.where(keep, x, 0.0)
    rollout = rollout._replace(
        mask=mask, logprobs=cut(rollout.logprobs), ref_logprobs=cut(ref), values=cut(rollout.values)
    )
    return ppo_models, hp, policy, critic, rollout


@pytest.mark.parametrize(
    "loss_agg, grad_accum, remat",
    [("token_mean", 1, "none"), ("seq_mean", 2, "none"), ("token_mean", 1, "full")],
)
def test_one_minibatch_update_equals_hand_written_reference(full_setup, loss_agg, grad_accum, remat):
    """1 epoch x 1 minibatch (as 1 or 2 micro-batches: accumulation is exact; with the blocks
    rematerialised) == jax.grad + one optax step."""
    ppo_models, hp, policy, critic, rollout = full_setup
    hp = hp.replace(loss_agg=loss_agg, grad_accum=grad_accum, remat=remat)
    state = _init(ppo_models, hp, policy, critic, ADAMW_REF, SGD)
    want_p, want_c, want_m = _reference_update(ppo_models, hp, state, rl.PPOFrozen(), rollout, ADAMW_REF, SGD)
    update = rl.jit_ppo_update(
        rl.make_ppo_update(ppo_models, hp, policy_optimizer=ADAMW_REF, critic_optimizer=SGD)
    )
    new, m = update(state, rl.PPOFrozen(), rollout, jax.random.PRNGKey(0))
    # separate optimizers and learning rates: AdamW (lr 1e-3) moves the policy, SGD (lr 0.05) the critic
    chex.assert_trees_all_close(new.policy, want_p, atol=2e-6, rtol=1e-5)
    chex.assert_trees_all_close(new.critic, want_c, atol=2e-6, rtol=1e-5)
    for k in ("policy_loss", "value_loss", "clipfrac", "approx_kl", "ratio", "advantage_mean"):
        np.testing.assert_allclose(m[k], want_m[k], rtol=1e-4, atol=1e-6, err_msg=k)
    assert float(m["ratio_first"]) == pytest.approx(1.0, abs=1e-5)
    if remat != "none":  # the blocks really are rematerialised in the update
        from tests._jaxpr import all_eqns

        raw = rl.make_ppo_update(ppo_models, hp, policy_optimizer=ADAMW_REF, critic_optimizer=SGD)
        jaxpr = jax.make_jaxpr(raw)(state, rl.PPOFrozen(), rollout, jax.random.PRNGKey(0))
        names = {e.primitive.name for e in all_eqns(jaxpr.jaxpr)}
        assert names & {"checkpoint", "remat", "remat2"}, sorted(names)


def test_critic_warmup_keeps_the_policy_and_ema_follows_each_step():
    ppo_models, frozen, policy, critic = S.lora_setup()
    hp = rl.PPOHyperParams(
        epochs=1, num_minibatches=1, critic_warmup_iterations=1, ema_decay=0.5, ptx_coef=0.5
    )
    state = _init(ppo_models, hp, policy, critic)
    rollout = S.make_rollout(ppo_models, state, frozen, frozen.policy_base)
    update = rl.jit_ppo_update(
        rl.make_ppo_update(ppo_models, hp, policy_optimizer=ADAMW, critic_optimizer=ADAMW)
    )
    r = np.random.default_rng(0)
    ptx = {"input_ids": r.integers(3, _tiny.VOCAB, (2, 10)).astype(np.int32),
           "attention_mask": np.ones((2, 10), np.int32), "loss_mask": np.ones((2, 10), np.int32)}  # fmt: skip
    s1, m1 = update(state, frozen, rollout, jax.random.PRNGKey(0), ptx)
    assert float(m1["policy_updated"]) == 0.0
    assert float(m1["ptx_loss"]) > np.log(_tiny.VOCAB) / 4  # the pretraining NLL of random tokens
    chex.assert_trees_all_equal(s1.policy, policy)  # warm-up: the policy, its Adam moments and EMA stay
    chex.assert_trees_all_equal(s1.ema.params, policy)
    assert all(float(jnp.max(jnp.abs(x))) == 0 for x in jax.tree.leaves(s1.policy_opt[1][0].mu))
    assert float(jnp.max(jnp.abs(s1.critic["head"]["kernel"] - critic["head"]["kernel"]))) > 0
    ema_before = S.copy(s1.ema.params)
    s2, m2 = update(s1, frozen, rollout, jax.random.PRNGKey(1), ptx)
    assert float(m2["policy_updated"]) == 1.0
    assert (
        max(jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), s2.policy, policy))) > 0
    )
    assert rl.export_policy(s2) is s2.ema.params
    # one optimizer step: ema = 0.5 * ema + 0.5 * params
    chex.assert_trees_all_close(
        s2.ema.params, jax.tree.map(lambda e, p: 0.5 * e + 0.5 * p, ema_before, s2.policy)
    )


def test_rows_must_divide_into_minibatches():
    ppo_models, frozen, policy, critic = S.lora_setup()
    hp = rl.PPOHyperParams(epochs=1, num_minibatches=3)
    state = _init(ppo_models, hp, policy, critic)
    rollout = S.make_rollout(ppo_models, state, frozen, frozen.policy_base)
    update = rl.make_ppo_update(ppo_models, hp, policy_optimizer=ADAMW, critic_optimizer=ADAMW)
    with pytest.raises(ValueError, match=r"8 rows, not divisible by num_minibatches \* grad_accum = 3 \* 1"):
        jax.eval_shape(update, state, frozen, rollout, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="dual_clip"):
        rl.PPOHyperParams(dual_clip=0.9)
