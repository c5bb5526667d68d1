"""Sharded forward on 8 fake CPU devices (fsdp=4, tensor=2) equals single-device; weights really sharded."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _hf_tiny import tiny_hf_config
from jax.sharding import PartitionSpec
from test_decoder import random_params

from jaxrlhf import models, sharding
from jaxrlhf.models.spec import ModelSpec


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() == 8
    return sharding.make_mesh(fsdp=4, tensor=2)


@pytest.mark.parametrize("name", ["llama3", "opt_post"])
def test_sharded_forward_equals_single_device(mesh, name):
    spec = ModelSpec.from_hf_config(tiny_hf_config(name).to_dict())
    axes = models.param_axes(spec)
    if name == "llama3":  # created sharded (jit with out_shardings)
        sharded = models.init_params(spec, jax.random.key(0), mesh=mesh)
        params = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), sharded)  # one-device copy
    else:  # created on one device, then placed
        params = random_params(spec)
        sharded = sharding.shard_params(params, axes, mesh)
    for path, x in jax.tree_util.tree_leaves_with_path(sharded):
        if x.ndim == 2:  # every weight matrix is split across devices
            assert not x.sharding.is_fully_replicated, jax.tree_util.keystr(path)
    kernel = sharded["layers_0"]["mlp"]["up_proj"]["kernel"]
    assert kernel.sharding.spec == PartitionSpec("fsdp", "tensor")
    assert axes["layers_0"]["mlp"]["up_proj"]["kernel"] == ("embed", "mlp")

    ids = jax.random.randint(jax.random.key(1), (8, 8), 3, 128)
    mask = jnp.ones((8, 8), jnp.int32).at[1, :3].set(0)
    ref = jax.jit(models.forward, static_argnums=0)(spec, params, ids, mask).logits
    out = models.jit_forward(spec, mesh)(sharded, ids, mask)
    assert not out.logits.sharding.is_fully_replicated
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(ref), atol=1e-5)


def test_constrain_under_set_mesh(mesh):
    x = jnp.ones((8, 4, 16))

    @jax.jit
    def f(x):
        return sharding.constrain(x * 2, ("batch", "length", "act_mlp"))

    assert f(x).sharding.is_fully_replicated  # no mesh in context: identity
    with sharding.use_mesh(mesh):
        y = f(x)
    assert y.sharding.spec == PartitionSpec(("fsdp",), None, "tensor") or y.sharding.spec == PartitionSpec(
        "fsdp", None, "tensor"
    )
    np.testing.assert_array_equal(np.asarray(y), 2 * np.ones((8, 4, 16)))
