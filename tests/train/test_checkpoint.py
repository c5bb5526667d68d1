"""Resume exactness, crash-safe listing, retention, graceful stop and metric sinks (toy model, CPU f32)."""

import json
import os
import signal

import chex
import numpy as np
import pytest

from jaxrlhf import train
from tests.train._toy import CountingSource, toy_batch, toy_loss, toy_loss_dropout, toy_params

CFG = train.OptimConfig(lr=3e-2, schedule="cosine", warmup_steps=2, total_steps=8, weight_decay=0.1)


@pytest.fixture(scope="module")
def step_fn():
    opt = train.make_optimizer(CFG)
    step = train.make_train_step(toy_loss_dropout, opt, schedule=train.make_schedule(CFG))
    return opt, train.jit_train_step(step)


def _fresh(opt):
    return train.init_train_state(toy_params(), opt, 42)[0]


def _run(tmp, opt, step, total, *, resume: bool, interval: int):
    src = CountingSource(seed=7)
    state = _fresh(opt)
    mgr = train.CheckpointManager(tmp / "ckpt", save_interval_steps=interval, max_to_keep=2)
    if resume:
        state, loader_state = mgr.restore_latest(state)
        assert loader_state is not None
        src.restore(loader_state)
    writer = train.MetricsWriter(tmp / "logs", tensorboard=False)
    res = train.train_loop(
        state, step, src, total_steps=total, ckpt_manager=mgr, writer=writer, progress=False
    )
    writer.close()
    mgr.close()
    return res, train.read_jsonl(tmp / "logs" / "metrics.jsonl")


def test_resume_is_exact(tmp_path, step_fn):
    """4 steps, stop, restart from the checkpoint, 4 more == 8 uninterrupted (params, loss curve, loader)."""
    opt, step = step_fn
    full, full_log = _run(tmp_path / "a", opt, step, 8, resume=False, interval=100)
    _run(tmp_path / "b", opt, step, 4, resume=False, interval=100)
    resumed, log = _run(tmp_path / "b", opt, step, 8, resume=True, interval=100)
    assert [r["step"] for r in log] == list(range(1, 9))
    np.testing.assert_allclose([r["loss"] for r in log], [r["loss"] for r in full_log], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose([r["lr"] for r in log], [r["lr"] for r in full_log], rtol=1e-6)
    chex.assert_trees_all_close(resumed.state.params, full.state.params, atol=1e-6, rtol=1e-6)
    chex.assert_trees_all_close(resumed.state.opt_state, full.state.opt_state, atol=1e-6, rtol=1e-6)
    assert int(resumed.state.step) == 8
    np.testing.assert_array_equal(resumed.state.rng, full.state.rng)


def test_partial_save_is_never_listed_and_retention(tmp_path, step_fn):
    opt, step = step_fn
    state = _fresh(opt)
    mgr = train.CheckpointManager(tmp_path, save_interval_steps=1, max_to_keep=2)
    for i in range(4):
        state, _ = step(state, toy_batch(i))
        assert mgr.save(state, {"pos": i + 1})
    mgr.wait()
    assert mgr.all_steps() == [3, 4]  # max_to_keep
    # a crash in the middle of writing step 5: Orbax writes under a temporary name until complete
    partial = tmp_path / "5.orbax-checkpoint-tmp-1234567"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "garbage").write_bytes(b"\0" * 10)
    mgr2 = train.CheckpointManager(tmp_path, save_interval_steps=1, max_to_keep=2)
    assert mgr2.latest_step() == 4
    restored, loader_state = mgr2.restore_latest(_fresh(opt))
    assert loader_state == {"pos": 4} and int(restored.step) == 4
    chex.assert_trees_all_close(restored.params, state.params)
    mgr.close()
    mgr2.close()


def test_sigterm_saves_and_stops(tmp_path, step_fn):
    opt, step = step_fn

    class KillAt(CountingSource):
        def __next__(self):
            if self.pos == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            return super().__next__()

    mgr = train.CheckpointManager(tmp_path / "ck", save_interval_steps=1000)
    res = train.train_loop(_fresh(opt), step, KillAt(), total_steps=8, ckpt_manager=mgr, progress=False)
    assert res.interrupted and int(res.state.step) == 4  # the step in flight finishes
    assert mgr.all_steps() == [4]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))
    _, loader_state = mgr.restore_latest(_fresh(opt))
    assert loader_state == {"seed": 0, "pos": 4}
    mgr.close()


def test_loop_metrics_eval_and_tensorboard(tmp_path):
    opt = train.make_optimizer(CFG)
    step = train.jit_train_step(train.make_train_step(toy_loss, opt, schedule=train.make_schedule(CFG)))
    eval_step = train.make_eval_step(toy_loss)
    eval_batches = [toy_batch(100 + i) for i in range(3)]
    writer = train.MetricsWriter(tmp_path)
    res = train.train_loop(
        _fresh(opt),
        step,
        CountingSource(),
        total_steps=4,
        writer=writer,
        log_every=2,
        progress=True,
        eval_fn=lambda s: train.evaluate(eval_step, s, eval_batches),
        eval_every=2,
        flops_per_token=1e3,
        peak_flops=1e12,
    )
    writer.close()
    log = train.read_jsonl(tmp_path / "metrics.jsonl")
    train_rows = [r for r in log if "loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4]
    for key in ("loss", "grad_norm", "lr", "tokens_per_s", "step_time", "mfu", "weight"):
        assert key in train_rows[0], key
    np.testing.assert_allclose(train_rows[0]["mfu"], 1e3 * train_rows[0]["tokens_per_s"] / 1e12, rtol=1e-9)
    eval_rows = [r for r in log if "eval/loss" in r]
    assert [r["step"] for r in eval_rows] == [2, 4]
    # evaluation = token-weighted mean NLL over the whole eval set, computed here independently
    nll = sum(
        float(toy_loss(res.state.params, None, b, None)[0]) * (b["mask"][:, 1:].sum()) for b in eval_batches
    )
    n = sum(b["mask"][:, 1:].sum() for b in eval_batches)
    np.testing.assert_allclose(eval_rows[-1]["eval/loss"], nll / n, rtol=1e-5)
    np.testing.assert_allclose(eval_rows[-1]["eval/ppl"], np.exp(nll / n), rtol=1e-5)
    events = os.listdir(tmp_path / "tensorboard")
    assert any(e.startswith("events.out.tfevents") for e in events)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    from tensorboard.util import tensor_util

    events = acc.Tensors("loss")  # tensorboard.summary writes v2 (tensor) scalars
    assert [e.step for e in events] == [2, 4]
    np.testing.assert_allclose(
        tensor_util.make_ndarray(events[-1].tensor_proto), train_rows[-1]["loss"], rtol=1e-6
    )
    json.dumps(res.last_metrics)
