"""Properties of the PPO pieces: EMA closed form, PPO-ptx and the k3 KL-in-loss gradients, a T5 policy."""

from __future__ import annotations

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf import losses, models, rl, train
from tests.rl import _ppo_setup as S
from tests.rl import _tiny


@hypothesis.given(st.sampled_from([0.0, 0.5, 0.9]), st.integers(1, 6), st.integers(0, 2**31))
def test_ema_closed_form_with_constant_params(decay, k, seed):
    rng = np.random.default_rng(seed)
    e0 = {"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32), "b": jnp.asarray(rng.normal(size=(2,)))}
    p = jax.tree.map(lambda x: x + 1.0, e0)
    ema = rl.ema(decay)
    state = ema.init(e0)
    for _ in range(k):
        state = ema.update(state, p)
    want = jax.tree.map(lambda e, q: decay**k * e + (1 - decay**k) * q, e0, p)
    chex.assert_trees_all_close(state.params, want, atol=1e-5)
    if decay == 0.0:
        chex.assert_trees_all_equal(state.params, p)  # decay 0 copies


def _loss_inputs():
    """A full-parameter policy / critic, one micro-batch of rollout data with advantages, a ptx batch."""
    spec = _tiny.SPECS["llama"]
    ppo_models = rl.PPOModels(spec, spec)
    policy = _tiny.params("llama")
    critic = {"backbone": _tiny.params("llama", seed=1), "head": _tiny.head("llama", 3)}
    hp = rl.PPOHyperParams()
    state, _ = rl.init_ppo_state(
        ppo_models, hp, policy, critic, policy_optimizer=train.make_optimizer(train.OptimConfig()),
        critic_optimizer=train.make_optimizer(train.OptimConfig()), rng=0,
    )  # fmt: skip
    ro = S.make_rollout(ppo_models, state, rl.PPOFrozen(), policy, n_prompts=2, new=6)
    ref = ro.ref_logprobs - 0.2 * ro.mask
    adv = jnp.asarray(np.random.default_rng(0).normal(size=ro.mask.shape), jnp.float32) * ro.mask
    batch = dict(prompt_ids=ro.prompt_ids, prompt_mask=ro.prompt_mask, tokens=ro.tokens, mask=ro.mask,
                 logprobs=ro.logprobs, ref_logprobs=ref, values=ro.values, advantages=adv,
                 returns=ro.values + adv)  # fmt: skip
    r = np.random.default_rng(1)
    ptx = {"input_ids": jnp.asarray(r.integers(3, _tiny.VOCAB, (3, 10)), jnp.int32),
           "attention_mask": jnp.ones((3, 10), jnp.int32),
           "loss_mask": jnp.asarray(r.random((3, 10)) < 0.7, jnp.int32)}  # fmt: skip
    denom = {"tokens": jnp.sum(ro.mask), "seqs": jnp.float32(ro.mask.shape[0])}
    return ppo_models, policy, critic, batch, ptx, denom


def _grad_fn(ppo_models, hp):
    """The jitted policy gradient of ``hp``'s PPO loss (one compilation per hyper-parameters and inputs;
    the KL coefficient is an argument)."""
    loss_fn = rl.make_ppo_loss(ppo_models, hp)
    return jax.jit(jax.grad(lambda p, critic, *args: loss_fn(p, critic, *args)[0]))


def _policy_grad(ppo_models, hp, policy, critic, batch, ptx, denom, kl_coef=0.0, grad_fn=None):
    ptx_tokens = jnp.sum(ptx["loss_mask"][:, 1:]).astype(jnp.float32) if ptx is not None else 0.0
    args = (rl.PPOFrozen(), batch, denom, jnp.float32(kl_coef), ptx, ptx_tokens, jax.random.PRNGKey(0))
    return (grad_fn or _grad_fn(ppo_models, hp))(policy, critic, *args)


def test_ptx_adds_gamma_times_the_pretraining_nll_gradient_and_kl_in_loss_adds_k3():
    ppo_models, policy, critic, batch, ptx, denom = _loss_inputs()
    spec = ppo_models.policy_spec
    hp = rl.PPOHyperParams()
    plain = _policy_grad(ppo_models, hp, policy, critic, batch, None, denom)
    zero = _policy_grad(ppo_models, hp.replace(ptx_coef=0.0), policy, critic, batch, ptx, denom)
    chex.assert_trees_all_close(zero, plain, atol=1e-7)  # coefficient 0: no change

    def nll(p):
        out = models.forward(spec, p, ptx["input_ids"], ptx["attention_mask"])
        return losses.sft_loss(out.logits[:, :-1], ptx["input_ids"][:, 1:], ptx["loss_mask"][:, 1:])[0]

    gamma = 0.7
    with_ptx = _policy_grad(ppo_models, hp.replace(ptx_coef=gamma), policy, critic, batch, ptx, denom)
    want = jax.tree.map(lambda a, g: a + gamma * g, plain, jax.jit(jax.grad(nll))(policy))
    chex.assert_trees_all_close(with_ptx, want, atol=1e-6, rtol=1e-5)

    # kl_mode="loss": + kl_coef * token-mean k3(pi, ref), gradient linear in the coefficient
    hp_kl = hp.replace(kl_mode="loss")
    kl_grad = _grad_fn(ppo_models, hp_kl)  # one compilation for both coefficients
    g0 = _policy_grad(ppo_models, hp_kl, policy, critic, batch, None, denom, kl_coef=0.0, grad_fn=kl_grad)
    g1 = _policy_grad(ppo_models, hp_kl, policy, critic, batch, None, denom, kl_coef=0.3, grad_fn=kl_grad)
    inputs = (batch["prompt_ids"], batch["prompt_mask"], batch["tokens"], batch["mask"])

    def k3(p):
        lp = S.logprobs_jit(spec, p, *inputs)
        kl = losses.kl_penalty(lp, batch["ref_logprobs"], estimator="k3")
        return losses.masked_mean(kl, batch["mask"])

    chex.assert_trees_all_close(g0, plain, atol=1e-7)
    chex.assert_trees_all_close(
        g1, jax.tree.map(lambda a, g: a + 0.3 * g, plain, jax.jit(jax.grad(k3))(policy)), atol=1e-6, rtol=1e-5
    )


def test_t5_policy_first_ratio_is_one():
    """Encoder-decoder policy (LoRA) and a T5 critic backbone (decoder hidden states feed the value head)."""
    spec = _tiny.SPECS["t5"]
    base = _tiny.params("t5")
    ppo_models = rl.PPOModels(spec, spec, policy_lora=_tiny.LORA)
    frozen = rl.PPOFrozen(policy_base=base)
    critic = {"backbone": _tiny.params("t5", seed=1), "head": _tiny.head("t5", 3)}
    hp = rl.PPOHyperParams(epochs=1, num_minibatches=2)
    opt = train.make_optimizer(train.OptimConfig(lr=1e-3, schedule="constant"))
    state, _ = rl.init_ppo_state(
        ppo_models,
        hp,
        _tiny.adapters("t5", 1, base),
        critic,
        policy_optimizer=opt,
        critic_optimizer=opt,
        rng=0,
    )
    rollout = S.make_rollout(ppo_models, state, frozen, base, new=6)
    update = rl.jit_ppo_update(rl.make_ppo_update(ppo_models, hp, policy_optimizer=opt, critic_optimizer=opt))
    new, m = update(state, frozen, rollout, jax.random.PRNGKey(0))
    assert abs(float(m["ratio_first"]) - 1.0) <= 1e-5 and float(m["approx_kl_first"]) <= 1e-5
    assert float(m["value_loss"]) > 0 and np.isfinite(float(m["policy_grad_norm"]))
    assert int(new.step) == 2
