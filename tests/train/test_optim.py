"""Schedules vs transformers' closed forms, decay masks, and gradient accumulation == one big batch."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf import train
from tests.train._toy import toy_batch, toy_loss, toy_params


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
def test_schedule_matches_transformers(kind):
    import torch
    import transformers

    warm, total, lr = 7, 50, 3e-4
    cfg = train.OptimConfig(lr=lr, schedule=kind, warmup_steps=warm, total_steps=total)
    sched = jax.jit(train.make_schedule(cfg))
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    hf = {
        "constant": transformers.get_constant_schedule_with_warmup(opt, warm),
        "linear": transformers.get_linear_schedule_with_warmup(opt, warm, total),
        "cosine": transformers.get_cosine_schedule_with_warmup(opt, warm, total),
    }[kind]
    for s in [0, 1, 3, 6, 7, 8, 20, 33, 49, 50]:
        expected = lr * hf.lr_lambdas[0](s)
        np.testing.assert_allclose(float(sched(s)), expected, rtol=1e-5, atol=1e-12, err_msg=f"step {s}")
    # past total_steps we hold the final value (HF's cosine would rise again)
    np.testing.assert_allclose(float(sched(60)), float(sched(50)), atol=1e-12)


def test_schedule_min_lr_ratio_closed_form():
    cfg = train.OptimConfig(lr=1.0, schedule="cosine", warmup_steps=0, total_steps=10, min_lr_ratio=0.1)
    sched = train.make_schedule(cfg)
    for s in range(12):
        p = min(s / 10, 1.0)
        np.testing.assert_allclose(float(sched(s)), 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)), rtol=1e-6)


def test_decay_mask_excludes_norms_biases_embeddings():
    p = toy_params()
    m = train.decay_mask(p)
    assert m["layers_0"]["mlp"]["up_proj"]["kernel"] and m["lm_head"]["kernel"]
    assert not m["layers_0"]["mlp"]["up_proj"]["bias"]
    assert not m["layers_0"]["input_norm"]["scale"]
    assert not m["embed_tokens"]["embedding"]
    assert train.decay_mask(p, decay_embeddings=True)["embed_tokens"]["embedding"]


def test_weight_decay_only_on_masked_leaves():
    """With zero gradients, AdamW's only change is -lr * wd * p on decayed leaves."""
    p = toy_params()
    cfg = train.OptimConfig(lr=0.1, schedule="constant", weight_decay=0.5, clip_norm=None)
    opt = train.make_optimizer(cfg)
    zeros = jax.tree.map(jnp.zeros_like, p)
    upd, _ = opt.update(zeros, opt.init(p), p)
    chex.assert_trees_all_close(
        upd["layers_0"]["mlp"]["up_proj"]["kernel"],
        -0.05 * p["layers_0"]["mlp"]["up_proj"]["kernel"],
        rtol=1e-6,
    )
    for leaf in (
        upd["embed_tokens"]["embedding"],
        upd["layers_0"]["input_norm"]["scale"],
        upd["layers_0"]["mlp"]["up_proj"]["bias"],
    ):
        assert float(jnp.abs(leaf).max()) == 0.0


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_grad_accum_equals_big_batch(name):
    """k micro-batches with ragged masks (token-weighted) == one step on the concatenated batch."""
    k = 3
    cfg = train.OptimConfig(
        name=name, lr=1e-2, schedule="constant", weight_decay=0.01, clip_norm=0.5, momentum=0.9
    )
    opt = train.make_optimizer(cfg)
    micro = [toy_batch(i) for i in range(k)]
    stacked = jax.tree.map(lambda *xs: np.stack(xs), *micro)
    big = jax.tree.map(lambda *xs: np.concatenate(xs), *micro)
    s0, _ = train.init_train_state(toy_params(), opt, 0)
    acc_step = jax.jit(train.make_train_step(toy_loss, opt, grad_accum=k))
    one_step = jax.jit(train.make_train_step(toy_loss, opt, grad_accum=1))
    a, b = s0, s0
    for _ in range(2):
        a, ma = acc_step(a, stacked)
        b, mb = one_step(b, big)
        np.testing.assert_allclose(ma["loss"], mb["loss"], rtol=1e-6)
        np.testing.assert_allclose(ma["grad_norm"], mb["grad_norm"], rtol=1e-5)
    chex.assert_trees_all_close(a.params, b.params, atol=1e-6, rtol=1e-6)


def test_clipping_bounds_update():
    """SGD lr=1 with clip c: the parameter change has global norm <= c."""
    cfg = train.OptimConfig(name="sgd", lr=1.0, schedule="constant", clip_norm=1e-3)
    opt = train.make_optimizer(cfg)
    s0, _ = train.init_train_state(toy_params(), opt, 0)
    s1, m = jax.jit(train.make_train_step(toy_loss, opt))(s0, toy_batch(0))
    delta = jax.tree.map(lambda a, b: a - b, s1.params, toy_params())
    assert float(m["grad_norm"]) > 1e-3
    np.testing.assert_allclose(
        float(jnp.sqrt(sum(jnp.sum(d * d) for d in jax.tree.leaves(delta)))), 1e-3, rtol=1e-4
    )


def test_one_batch_step_differentiates_the_mean_and_skips_an_empty_batch():
    """grad_accum = 1 differentiates the loss itself (== the token-weighted form), so the chunked SFT loss's
    backward scales its forward-computed gradients by the literal 1 and XLA drops that multiply (no extra
    pass over the LM head's [E, V] gradient); a batch with no loss tokens (weight 0) is skipped, as its 0 / 0
    gradient was before."""
    import re

    from jaxrlhf import losses
    from jaxrlhf.train import step as step_lib

    b, t, e, v = 2, 16, 8, 37
    h = jax.random.normal(jax.random.key(0), (b, t, e))
    y = jax.random.randint(jax.random.key(2), (b, t), 0, v)
    m = jnp.broadcast_to((jnp.arange(t) > 3).astype(jnp.float32), (b, t))

    def loss_fn(p, frozen, batch, rng):
        loss, mt = losses.chunked_sft_loss(h, p["w"], y, m, chunk_size=8)
        return loss, {"weight": mt["token_count"]}

    params = {"w": jax.random.normal(jax.random.key(1), (e, v))}
    grads = {}
    for weighted in (True, False):
        f = jax.jit(lambda p, wt=weighted: step_lib._grads_one(loss_fn, p, None, None, None, None, wt))
        g, _, _, w = f(params)
        grads[weighted] = g["w"] / w if weighted else g["w"]
        hlo = f.lower(params).compile().as_text()
        muls = [ln for ln in hlo.splitlines() if re.search(rf"f32\[{e},{v}\]\S* multiply\(", ln)]
        assert len(muls) == (1 if weighted else 0), muls
    np.testing.assert_allclose(grads[False], grads[True], rtol=1e-5, atol=1e-7)

    opt = train.make_optimizer(train.OptimConfig(name="adamw", lr=1e-2, schedule="constant"))
    s0, _ = train.init_train_state(toy_params(), opt, 0)
    batch = toy_batch(0)
    batch["mask"] = np.zeros_like(batch["mask"])
    s1, metrics = jax.jit(train.make_train_step(toy_loss, opt))(s0, batch)
    assert float(metrics["skipped"]) == 1.0
    chex.assert_trees_all_equal(s1.params, s0.params)
