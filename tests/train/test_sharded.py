"""Sharded training on 8 fake CPU devices (fsdp=4, tensor=2) == single device; restore onto other meshes."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf import models, sharding, train
from tests.train._lm import TINY_LLAMA, lm_batch, lm_loss

CFG = train.OptimConfig(lr=1e-2, schedule="linear", warmup_steps=1, total_steps=10, weight_decay=0.1)
STEPS = 3


@pytest.fixture(scope="module")
def runs():
    spec = TINY_LLAMA
    params = models.init_params(spec, jax.random.PRNGKey(0))
    opt = train.make_optimizer(CFG)
    step = train.make_train_step(lm_loss(spec), opt, grad_accum=2, schedule=train.make_schedule(CFG))
    batches = [jax.tree.map(lambda x: x.reshape(2, 4, *x.shape[1:]), lm_batch(i)) for i in range(STEPS)]

    # the steps donate their state: give each run its own copy of the initial params
    single, _ = train.init_train_state(jax.tree.map(jnp.copy, params), opt, 0)
    single_step = train.jit_train_step(step)
    mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
    sharded, shard = train.init_train_state(params, opt, 0, mesh=mesh, params_axes=models.param_axes(spec))
    sharded_step = train.jit_train_step(step, shard, mesh=mesh, grad_accum=2)
    losses = {"single": [], "sharded": []}
    for b in batches:
        single, m1 = single_step(single, b)
        sharded, m2 = sharded_step(sharded, b)
        losses["single"].append(float(m1["loss"]))
        losses["sharded"].append(float(m2["loss"]))
    return spec, opt, single, sharded, shard, mesh, losses


def test_sharded_matches_single_device(runs):
    spec, _, single, sharded, shard, _, losses = runs
    np.testing.assert_allclose(losses["sharded"], losses["single"], rtol=1e-5)
    assert losses["single"][-1] < losses["single"][0]
    chex.assert_trees_all_close(
        jax.device_get(sharded.params), jax.device_get(single.params), atol=2e-5, rtol=1e-4
    )
    # the sharding really happened: q_proj [embed=fsdp, heads=tensor] holds 1/8 of the kernel per device
    q = sharded.params["layers_0"]["attn"]["q_proj"]["kernel"]
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert q.addressable_shards[0].data.shape == (32 // 4, 32 // 2)
    # AdamW moments follow their parameter's sharding
    mu = sharded.opt_state[1][0].mu["layers_0"]["attn"]["q_proj"]["kernel"]
    assert mu.sharding.spec == q.sharding.spec


@pytest.mark.parametrize("n_devices", [4, 1])
def test_restore_onto_a_different_mesh(tmp_path, runs, n_devices):
    spec, opt, _, sharded, _, _, _ = runs
    mgr = train.CheckpointManager(tmp_path, save_interval_steps=1)
    assert mgr.save(sharded, {"step": STEPS})
    mgr.wait()
    devices = jax.devices()[:n_devices]
    mesh = sharding.make_mesh(data=1, fsdp=-1, tensor=min(2, n_devices), devices=devices)
    target = train.abstract_state(sharded)
    target_shard = train.state_shardings(target, mesh, models.param_axes(spec))
    restored, loader_state = train.CheckpointManager(tmp_path).restore_latest(target, target_shard)
    assert loader_state == {"step": STEPS}
    chex.assert_trees_all_close(jax.device_get(restored), jax.device_get(sharded))
    for leaf in jax.tree.leaves(restored):
        assert leaf.sharding.device_set == set(devices)
    q = restored.params["layers_0"]["attn"]["q_proj"]["kernel"]
    assert q.sharding == target_shard.params["layers_0"]["attn"]["q_proj"]["kernel"]
