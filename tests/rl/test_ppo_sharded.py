"""rl.ppo on 8 fake CPU devices: the sharded update (fsdp=4 x tensor=2, data=2 x fsdp=4) == unsharded."""

from __future__ import annotations

import chex
import jax
import numpy as np
import pytest

from jaxrlhf import rl, sharding, train
from tests.rl import _ppo_setup as S

OPT = train.make_optimizer(train.OptimConfig(lr=1e-3, schedule="constant", clip_norm=1.0, eps=1e-4))
HP = rl.PPOHyperParams(epochs=1, num_minibatches=2, ent_coef=0.01, kl_target=6.0)


@pytest.fixture(scope="module")
def single():
    ppo_models, frozen, policy, critic = S.lora_setup()
    state, _ = rl.init_ppo_state(
        ppo_models, HP, S.copy(policy), S.copy(critic), policy_optimizer=OPT, critic_optimizer=OPT, rng=0
    )
    rollout = S.make_rollout(ppo_models, state, frozen, frozen.policy_base)
    update = rl.jit_ppo_update(rl.make_ppo_update(ppo_models, HP, policy_optimizer=OPT, critic_optimizer=OPT))
    new, metrics = update(state, frozen, rollout, jax.random.PRNGKey(7))
    return rollout, jax.device_get(new), jax.device_get(metrics)


@pytest.mark.parametrize("mesh_shape", [(1, 4, 2), (2, 4, 1)])
def test_sharded_update_equals_single_device(single, mesh_shape):
    rollout, want, want_m = single
    ppo_models, frozen, policy, critic = S.lora_setup()
    mesh = sharding.make_mesh(*mesh_shape)
    state, shard = rl.init_ppo_state(
        ppo_models,
        HP,
        S.copy(policy),
        S.copy(critic),
        policy_optimizer=OPT,
        critic_optimizer=OPT,
        rng=0,
        mesh=mesh,
    )
    f_shard = rl.frozen_shardings(ppo_models, frozen, mesh)
    frozen_sh = jax.device_put(frozen, f_shard)
    update = rl.jit_ppo_update(
        rl.make_ppo_update(ppo_models, HP, policy_optimizer=OPT, critic_optimizer=OPT),
        mesh=mesh, state_shardings=shard, frozen_shardings=f_shard,
    )  # fmt: skip
    new, metrics = update(state, frozen_sh, rollout, jax.random.PRNGKey(7))
    # sharding really happened: adapters' input dim over fsdp, the base's q_proj over (fsdp, tensor)
    a = new.policy["layers_0"]["attn"]["q_proj"]["lora_a"]
    assert a.sharding.spec[0] == "fsdp" and a.addressable_shards[0].data.shape[0] == a.shape[0] // 4
    q = frozen_sh.policy_base["layers_0"]["attn"]["q_proj"]["kernel"]
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor" if mesh_shape[2] > 1 else None)
    mu = new.policy_opt[1][0].mu["layers_0"]["attn"]["q_proj"]["lora_a"]
    assert mu.sharding.spec == a.sharding.spec
    chex.assert_trees_all_close(jax.device_get(new.policy), want.policy, atol=2e-5, rtol=1e-4)
    chex.assert_trees_all_close(jax.device_get(new.critic), want.critic, atol=2e-5, rtol=1e-4)
    for k in (
        "policy_loss",
        "value_loss",
        "entropy",
        "ratio_first",
        "kl_ref",
        "kl_coef_next",
        "policy_grad_norm",
    ):
        np.testing.assert_allclose(metrics[k], want_m[k], rtol=1e-4, atol=1e-6, err_msg=k)
    assert not any(x.is_deleted() for x in jax.tree.leaves(frozen_sh))
