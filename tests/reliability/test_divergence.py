"""Divergence guards: a step with a NaN/inf loss or gradient is skipped (params and optimizer state unchanged)
and counted; ``max_nonfinite_steps`` of them in a row stop the run with a clear message and the last good
checkpoint kept on disk. The poisoned steps are chosen by the test: the toy loss returns NaN (or a NaN
gradient with a finite loss) on batches flagged ``poison``.
"""

from __future__ import annotations

import os
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "train"))
from _toy import toy_batch, toy_loss, toy_params  # noqa: E402

from jaxrlhf import train  # noqa: E402
from jaxrlhf.train.loop import DivergenceError  # noqa: E402


@jax.custom_vjp
def _nan_grad(x, flag):
    return x


def _fwd(x, flag):
    return x, flag


def _bwd(flag, g):
    return jnp.where(flag > 0, jnp.nan, g), jnp.zeros_like(flag)


_nan_grad.defvjp(_fwd, _bwd)


def poisoned_loss(params, frozen, batch, rng):
    """``toy_loss``; NaN loss where ``batch["poison"] == 1``, a NaN gradient (finite loss) where it is 2."""
    loss, m = toy_loss(params, frozen, batch, rng)
    p = batch["poison"].max()
    loss = jnp.where(p == 1, jnp.nan, loss)
    w = params["lm_head"]["kernel"]
    loss = loss + 0.0 * _nan_grad(w.sum(), (p == 2).astype(jnp.float32))
    return loss, m


def _batch(i, poison=0, accum=1):
    b = toy_batch(i, b=4 * accum)
    b["poison"] = np.full((4 * accum,), poison, np.int32)
    if accum > 1:
        b = {k: v.reshape((accum, 4) + v.shape[1:]) for k, v in b.items()}
    return b


def _setup(skip=True, accum=1):
    opt = train.make_optimizer(train.OptimConfig(lr=1e-2, total_steps=20, warmup_steps=0, grad_accum=accum))
    state, _ = train.init_train_state(toy_params(0), opt, 0)
    step = jax.jit(train.make_train_step(poisoned_loss, opt, grad_accum=accum, skip_nonfinite=skip))
    return state, step


@pytest.mark.parametrize("poison", [1, 2], ids=["nan-loss", "nan-grad"])
@pytest.mark.parametrize("accum", [1, 2])
def test_nonfinite_step_is_skipped(poison, accum):
    state, step = _setup(accum=accum)
    state, m = step(state, _batch(0, accum=accum))
    assert float(m["skipped"]) == 0.0
    before = jax.device_get(state)
    batch = _batch(1, poison, accum)
    if accum > 1:  # one poisoned micro-batch poisons the whole step
        batch["poison"][0] = 0
    after, m = step(state, batch)
    assert float(m["skipped"]) == 1.0
    assert not np.isfinite(float(m["loss"])) or not np.isfinite(float(m["grad_norm"]))
    assert int(after.step) == int(before.step) + 1
    chex.assert_trees_all_equal(jax.device_get(after.params), before.params)
    chex.assert_trees_all_equal(jax.device_get(after.opt_state), before.opt_state)
    assert not np.array_equal(np.asarray(after.rng), np.asarray(before.rng))
    # the next finite step updates as usual
    after, m = step(after, _batch(2, 0, accum))
    assert float(m["skipped"]) == 0.0 and np.isfinite(float(m["loss"]))
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(after.params)))


def test_finite_steps_equal_the_unguarded_step():
    guarded, g_step = _setup(skip=True)
    plain, p_step = _setup(skip=False)
    for i in range(4):
        guarded, gm = g_step(guarded, _batch(i))
        plain, pm = p_step(plain, _batch(i))
        np.testing.assert_allclose(float(gm["loss"]), float(pm["loss"]), rtol=1e-6)
    # equal up to float rounding (XLA fuses the select into the update)
    chex.assert_trees_all_close(jax.device_get(guarded.params), jax.device_get(plain.params), rtol=1e-6)
    chex.assert_trees_all_close(jax.device_get(guarded.opt_state), jax.device_get(plain.opt_state), rtol=1e-6)
    assert "skipped" not in pm


class _Source:
    def __init__(self, poisoned):
        self.poisoned, self.pos = poisoned, 0

    def __iter__(self):
        return self

    def __next__(self):
        self.pos += 1  # batch of step `pos` (1-based)
        return _batch(self.pos, 1 if self.pos in self.poisoned else 0)

    def state(self):
        return {"pos": self.pos}


def test_scattered_skips_are_counted_and_the_run_finishes(tmp_path):
    state, step = _setup()
    writer = train.MetricsWriter(str(tmp_path), tensorboard=False)
    result = train.train_loop(
        state, step, _Source({2, 4, 6}), total_steps=8, writer=writer, progress=False, max_nonfinite_steps=2
    )
    writer.close()
    assert int(result.state.step) == 8
    rows = train.read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["skipped"] for r in rows] == [0, 1, 0, 1, 0, 1, 0, 0]
    assert [r["nonfinite_skipped"] for r in rows] == [0, 1, 1, 2, 2, 3, 3, 3]


def test_k_in_a_row_stop_with_the_last_good_checkpoint(tmp_path):
    state, step = _setup()
    mgr = train.CheckpointManager(tmp_path / "ckpt", save_interval_steps=1, max_to_keep=2, async_save=False)
    with pytest.raises(DivergenceError) as info:
        train.train_loop(
            state, step, _Source({5, 6, 7, 8}), total_steps=10, ckpt_manager=mgr, progress=False,
            max_nonfinite_steps=3,
        )  # fmt: skip
    e = info.value
    assert e.steps == [5, 6, 7] and e.checkpoint == 6
    msg = str(e)
    assert "NaN/inf at 3 steps in a row (steps 5-7)" in msg and "last good checkpoint is step 6" in msg
    assert "optim.lr" in msg
    assert mgr.all_steps() == [5, 6]  # nothing saved at the step that stopped the run
    # the kept checkpoint holds finite params: those after step 4, the last real update
    ref_state, ref_step = _setup()
    for i in range(1, 5):
        ref_state, _ = ref_step(ref_state, _batch(i))
    restored, loader = mgr.restore(6, ref_state)
    assert loader == {"pos": 6}
    chex.assert_trees_all_equal(jax.device_get(restored.params), jax.device_get(ref_state.params))
    mgr.close()


def test_zero_disables_the_stop():
    state, step = _setup()
    result = train.train_loop(
        state, step, _Source(set(range(1, 7))), total_steps=6, progress=False, max_nonfinite_steps=0
    )
    chex.assert_trees_all_equal(jax.device_get(result.state.params), jax.device_get(_setup()[0].params))


@pytest.mark.slow
def test_a_diverging_stage_stops_with_the_message(tmp_path):
    """``jaxrlhf sft`` with a learning rate that blows the weights up: the first update is finite, the next
    steps' losses are not, so the run stops after 3 skips in a row, naming the steps and the checkpoint."""
    import subprocess

    import _chaos

    out = tmp_path / "run"
    cmd = _chaos.command(
        "sft",
        os.path.join(_chaos.ROOT, "configs/tiny/sft.yaml"),
        [
            "optim.lr=1e30", "optim.warmup_steps=0", "optim.schedule=constant", "optim.total_steps=8",
            "checkpoint.every=1", "train.eval_every=100", "train.log_every=1", "train.progress=false",
            "samples.num=0", "export.hf=false", f"output_dir={out}",
            f"tokenizer.cache_dir={tmp_path / 'tok'}",
        ],
    )  # fmt: skip
    p = subprocess.run(
        cmd, env=_chaos.env(str(tmp_path / "cache")), capture_output=True, text=True, timeout=300
    )
    log = p.stdout + p.stderr
    assert p.returncode == 3, log[-3000:]  # a run that stopped itself: one message, no traceback
    assert "Traceback" not in p.stderr
    assert "training diverged: the loss or gradient was NaN/inf at 3 steps in a row" in log, log[-3000:]
    assert "update skipped (1 in a row" in log
    assert not os.path.isdir(out / "stage")
    steps = sorted(int(n) for n in os.listdir(out / "checkpoints") if n.isdigit())
    assert steps and max(steps) < 8
    assert f"last good checkpoint is step {max(steps)}" in log
