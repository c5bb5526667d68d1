"""The jitted GRPO / RLOO update (rl.grpo) on tiny models.

- on a real ``rl.rollout`` (LoRA policy, reference = its base without adapters, reward model = the base + a
  head), sharded over 8 fake devices: the first ratio is exactly the rollout's (1), the policy moves, the
  base is neither donated nor changed, one compilation serves every rollout of one shape;
- gradient accumulation is exact: ``grad_accum = 2`` gives the parameters of ``grad_accum = 1`` for every
  loss type whose normaliser does not depend on the micro-batch (all but bnpo, which TRL too normalises per
  micro-batch), with SGD so that any difference would show;
- ``mask_truncated_completions`` leaves completions without a stop token out of the loss (no gradient).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrlhf import models, rl, sharding
from jaxrlhf.generation import SamplingConfig
from jaxrlhf.rl import prompts as prompts_lib
from jaxrlhf.rl import rollout as rollout_lib
from tests.rl import _tiny

N_GEN = 4


def _rollout(spec, state, base, lora_config, *, ref=None, no_ref=False, seed=0, new=8):
    ids, mask = _tiny.prompts((3, 7, 5, 2), seed=seed)
    texts = [" ".join(str(t) for t in r[m > 0]) for r, m in zip(ids, mask, strict=True)]
    batch = prompts_lib.PromptBatch(ids, mask, texts, [None] * len(ids), {}, np.arange(len(ids)))
    scorer = rl.Scorer(spec, _tiny.params("llama"), _tiny.head("llama", 7, 0.3))
    rewards = rl.Rewards(tokenizer=None, scorer=scorer, weights=(1.0,))
    models_ = rl.grpo_rollout_models(spec, state, base, lora_config=lora_config, ref=ref, no_ref=no_ref)
    sampling = SamplingConfig(max_new_tokens=new, n=N_GEN)
    return rollout_lib.rollout(models_, rewards, batch, jax.random.key(seed), sampling)


def test_sharded_update_on_a_real_rollout():
    spec, base = _tiny.SPECS["llama"], _tiny.params("llama")
    mesh = sharding.make_mesh(1, -1, 1)
    hp = rl.GRPOHyperParams(num_generations=N_GEN, beta=0.04, num_iterations=2, num_minibatches=2)
    opt = optax.adam(1e-2)
    state, shard = rl.init_grpo_state(
        spec, _tiny.adapters("llama", 1, base), optimizer=opt, rng=0, lora_config=_tiny.LORA, mesh=mesh
    )
    base_sh = sharding.named_shardings(models.param_axes(spec), mesh, base)
    base = jax.device_put(base, base_sh)
    update = rl.jit_grpo_update(
        rl.make_grpo_update(spec, hp, optimizer=opt, lora_config=_tiny.LORA),
        mesh=mesh, state_shardings=shard, base_shardings=base_sh,
    )  # fmt: skip
    before = jax.tree.map(np.asarray, (base, state.policy))
    for it in range(2):
        ro = _rollout(spec, state, base, _tiny.LORA, seed=it)
        assert float(jnp.max(jnp.abs(ro.logprobs - ro.ref_logprobs))) > 1e-3  # adapters change the model
        old_policy = state.policy
        state, m = update(state, base, ro, jax.random.key(10 + it))
        assert abs(float(m["ratio_first"]) - 1.0) <= 1e-5 and float(m["approx_kl_first"]) <= 1e-7
        assert all(np.isfinite(float(v)) for v in m.values())
        assert jax.tree.leaves(old_policy)[0].is_deleted()  # the state is donated
        assert not any(x.is_deleted() for x in jax.tree.leaves((base, ro)))  # base and rollout are not
    assert int(state.step) == 2 * 2 * 2 and int(state.iteration) == 2
    assert len(update.cache) == 1  # one compilation for rollouts of one shape
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, base), before[0])  # the base: not donated, unchanged
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - b))), state.policy, before[1])
    assert max(jax.tree.leaves(moved)) > 1e-4
    leaf = jax.tree.leaves(state.policy)[0]
    assert leaf.sharding.is_equivalent_to(jax.tree.leaves(shard.policy)[0], leaf.ndim)


@pytest.fixture(scope="module")
def full_setup():
    spec, base = _tiny.SPECS["llama"], _tiny.params("llama")
    opt = optax.sgd(0.5)
    state, _ = rl.init_grpo_state(spec, jax.tree.map(jnp.copy, base), optimizer=opt, rng=0)
    ro = _rollout(spec, state, None, None, ref=rollout_lib.Actor(spec, base))
    # move the old log-probs off the current ones: ratios away from 1, some clipped
    noise = jax.random.normal(jax.random.key(3), ro.logprobs.shape) * 0.2 * ro.mask
    return spec, base, opt, ro._replace(logprobs=ro.logprobs + noise)


@pytest.mark.parametrize(
    "loss_type,advantage", [("grpo", "grpo"), ("dr_grpo", "grpo"), ("dapo", "grpo"), ("luspo", "grpo"),
                            ("cispo", "grpo"), ("rloo", "rloo")],
)  # fmt: skip
def test_grad_accumulation_is_exact(full_setup, loss_type, advantage):
    spec, base, _, ro = full_setup
    out = []
    for k in (1, 2):
        hp = rl.GRPOHyperParams(
            num_generations=N_GEN, advantage=advantage, loss_type=loss_type,
            beta=0.04 if advantage == "grpo" else 0.1, grad_accum=k, num_minibatches=2,
            epsilon_high=1.3 if loss_type == "cispo" else None,
        )  # fmt: skip
        # luspo sums over tokens (a loss ~ T times larger): a smaller step keeps float noise from growing
        opt = optax.sgd(0.05 if loss_type == "luspo" else 0.5)
        state, _ = rl.init_grpo_state(spec, jax.tree.map(jnp.copy, base), optimizer=opt, rng=0)
        update = rl.jit_grpo_update(rl.make_grpo_update(spec, hp, optimizer=opt))
        state, m = update(state, None, ro, jax.random.key(1))
        out.append((state.policy, m))
    chex.assert_trees_all_close(out[1][0], out[0][0], atol=1e-5, rtol=1e-5)  # float32 summation order
    np.testing.assert_allclose(out[1][1]["loss"], out[0][1]["loss"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(out[1][1]["clipfrac"], out[0][1]["clipfrac"], atol=1e-6)
    moved = jax.tree.map(lambda a, b: jnp.max(jnp.abs(a - b)), out[0][0], base)
    assert max(float(x) for x in jax.tree.leaves(moved)) > 1e-4


def test_mask_truncated_completions(full_setup):
    spec, base, opt, ro = full_setup
    ro = ro._replace(ended=jnp.zeros_like(ro.ended))  # every completion truncated: nothing to learn from
    hp = rl.GRPOHyperParams(num_generations=N_GEN, mask_truncated_completions=True, loss_type="bnpo")
    state, _ = rl.init_grpo_state(spec, jax.tree.map(jnp.copy, base), optimizer=opt, rng=0)
    state, m = jax.jit(rl.make_grpo_update(spec, hp, optimizer=opt))(state, None, ro, jax.random.key(1))
    chex.assert_trees_all_close(state.policy, base, atol=0.0)
    assert float(m["grad_norm"]) == 0.0
