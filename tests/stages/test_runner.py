"""The stage runner: a run directory knows its config, checkpoints that do not fit are refused by key,
replayed steps are logged once, LoRA checkpoints hold no copy of the base (the stage records it by path and
fingerprint), and one frozen base carries several named adapter sets through a jitted step that does not
donate it."""

from __future__ import annotations

import os
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf import lora, models, sharding, train
from jaxrlhf.config import load_config
from jaxrlhf.stages import runner, sft
from tests.stages.test_sft import TINY, read_jsonl, shared_dirs
from tests.train._lm import TINY_LLAMA, lm_batch, lm_loss


def _cfg(out, tmp_path_factory, *extra):
    return load_config(
        sft.SFTConfig,
        TINY,
        [
            f"output_dir={out}",
            "optim.total_steps=4",
            "optim.warmup_steps=1",
            "checkpoint.every=2",
            "train.eval_every=0",
            "train.eval_batches=1",
            "train.log_every=1",
            "train.progress=false",
            "samples.num=0",
            *shared_dirs(tmp_path_factory),
            *extra,
        ],
    )


def _dir_bytes(path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    out = tmp_path_factory.mktemp("runner")
    return out, sft.run(_cfg(out, tmp_path_factory))


def test_a_changed_config_is_refused_with_the_keys_and_the_ways_out(first, tmp_path_factory):
    out, _ = first
    with open(out / "config.yaml") as f:
        before = f.read()
    with pytest.raises(runner.RunConfigMismatch) as e:
        sft.run(_cfg(out, tmp_path_factory, "optim.total_steps=50", "optim.lr=1e-2"))
    msg = str(e.value)
    assert "optim.lr: 0.003 -> 0.01" in msg and "total_steps" not in msg  # extending a run is allowed
    assert "--set name=" in msg and "checkpoint.resume=false" in msg
    with open(out / "config.yaml") as f:
        assert f.read() == before  # the record of what the weights were trained with is untouched


def test_a_checkpoint_that_does_not_fit_the_model_is_refused_by_key(first, tmp_path_factory):
    out, _ = first
    copy = tmp_path_factory.mktemp("runner_shape") / "run"
    shutil.copytree(out, copy)
    os.remove(copy / "run.json")  # past the config check: the checkpoint itself must be checked
    with pytest.raises(runner.RunConfigMismatch) as e:
        sft.run(_cfg(copy, tmp_path_factory, "model.spec.hidden_size=64", "model.spec.head_dim=16"))
    msg = str(e.value)
    assert "does not fit" in msg and "shape (320, 128) in the checkpoint, (320, 64) in this run" in msg
    assert "checkpoint.resume=false" in msg and len(msg.splitlines()) == 1


def test_replayed_steps_are_logged_once(first, tmp_path_factory):
    out, _ = first
    copy = tmp_path_factory.mktemp("runner_replay") / "run"
    shutil.copytree(out, copy)
    # as if killed after step 4 was logged but before its checkpoint was written
    shutil.rmtree(copy / "checkpoints" / "4")
    shutil.rmtree(copy / "stage")
    res = sft.run(_cfg(copy, tmp_path_factory))
    steps = [r["step"] for r in read_jsonl(copy / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3, 4]
    want = [r["loss"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    np.testing.assert_allclose([r["loss"] for r in read_jsonl(copy / "metrics.jsonl") if "loss" in r], want)
    assert res.stage_dir


def test_resume_false_starts_over(first, tmp_path_factory):
    out, _ = first
    copy = tmp_path_factory.mktemp("runner_over") / "run"
    shutil.copytree(out, copy)
    res = sft.run(
        _cfg(copy, tmp_path_factory, "checkpoint.resume=false", "optim.lr=1e-2", "optim.total_steps=2")
    )
    assert res.first_eval  # a fresh run: evaluated at step 0
    assert [r["step"] for r in read_jsonl(copy / "metrics.jsonl") if "loss" in r] == [1, 2]
    assert sorted(os.listdir(copy / "checkpoints")) == ["2"]
    assert load_config(sft.SFTConfig, copy / "config.yaml").optim.lr == 1e-2


def test_lora_checkpoints_hold_no_base_and_the_stage_records_it(first, tmp_path_factory):
    out, res = first
    assert os.path.isfile(out / "export" / "hf" / "model.safetensors")
    base_dir = tmp_path_factory.mktemp("runner_base") / "hf"
    shutil.copytree(out / "export" / "hf", base_dir)
    lo = tmp_path_factory.mktemp("runner_lora")
    sft.run(
        _cfg(
            lo, tmp_path_factory, f"model.path={base_dir}", "model.spec=null", "tokenizer.path=null",
            "lora.rank=4", "lora.alpha=8", "lora.targets=[q_proj, v_proj]", "optim.total_steps=2",
        )
    )  # fmt: skip
    stage = train.load_stage(lo / "stage")
    n_adapter = sum(x.size for x in jax.tree.leaves(stage.lora))
    state_bytes = _dir_bytes(lo / "checkpoints" / "2" / "state")
    base_bytes = os.path.getsize(base_dir / "model.safetensors")
    # adapters + AdamW's two moments in f32 (+ Orbax metadata, and OCDBT data files whose count varies with
    # the async write: 89-181 kB seen); the 1.4 MB base is not in there
    assert 3 * 4 * n_adapter <= state_bytes < base_bytes / 4, (
        state_bytes,
        n_adapter,
        base_bytes,
    )
    assert not os.path.isdir(lo / "stage" / "params")
    assert stage.base == {"path": str(base_dir), "fingerprint": train.weights_fingerprint(str(base_dir))}
    _, hf_params = models.load_pretrained(str(base_dir))
    chex.assert_trees_all_equal(stage.params, hf_params)
    # the exported merge and the recorded base agree with the adapters
    merged = models.load_pretrained(str(lo / "export" / "hf"))[1]
    chex.assert_trees_all_close(merged, lora.merge(hf_params, stage.lora, stage.lora_config), atol=1e-6)
    # a base that changed after training is refused (the adapters only fit the original weights)
    with open(base_dir / "model.safetensors", "ab") as f:
        f.write(b"\0" * 8)
    with pytest.raises(ValueError, match="changed since it was trained"):
        train.load_stage(lo / "stage")


def test_one_base_three_adapter_sets_base_not_donated(tmp_path):
    mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
    spec = TINY_LLAMA
    base = models.init_params(spec, jax.random.PRNGKey(0), mesh=mesh)
    sets = {
        "policy": lora.LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj")),
        "critic": lora.LoraConfig(rank=2, alpha=2, targets=("all-linear",)),
        "reward": lora.LoraConfig(rank=2, alpha=4, targets=("up_proj",)),
    }
    axes = models.param_axes(spec)
    ads = {n: lora.init(spec, base, c, jax.random.PRNGKey(i + 1)) for i, (n, c) in enumerate(sets.items())}
    policy_loss, critic_loss = (
        lm_loss(spec, lora_config=sets["policy"]),
        lm_loss(spec, lora_config=sets["critic"]),
    )

    def loss_fn(trainable, frozen, batch, rng):
        lp, _ = policy_loss(trainable["policy"], frozen, batch, rng)
        lc, _ = critic_loss(trainable["critic"], frozen, batch, rng)
        return lp + lc, {}

    trainable = {"policy": ads["policy"], "critic": ads["critic"]}
    t_axes = {n: lora.param_axes(axes, trainable[n]) for n in trainable}
    opt = train.make_optimizer(train.OptimConfig(lr=1e-2, schedule="constant"))
    state, shard = train.init_train_state(trainable, opt, 0, mesh=mesh, params_axes=t_axes)
    f_sh = sharding.named_shardings(axes, mesh, base)
    step = train.jit_train_step(train.make_train_step(loss_fn, opt), shard, mesh=mesh, frozen_shardings=f_sh)
    before = state
    for i in range(2):
        state, _ = step(state, lm_batch(i), base)
    q = base["layers_0"]["attn"]["q_proj"]["kernel"]
    assert not q.is_deleted() and q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert before.params["policy"]["layers_0"]["attn"]["q_proj"][
        "lora_a"
    ].is_deleted()  # the state is donated
    ids = lm_batch(0)["input_ids"]
    reward_out = models.forward(
        spec, base, ids, lora=ads["reward"], lora_config=sets["reward"]
    )  # base reused
    assert np.isfinite(np.asarray(reward_out.logits)).all()
    # saved side by side over the one base, loaded back onto the mesh
    train.save_stage(
        tmp_path / "stage", spec, base, lora=state.params["policy"], lora_config=sets["policy"],
        adapter_sets={
            "critic": (state.params["critic"], sets["critic"]), "reward": (ads["reward"], sets["reward"])
        },
        stage_info={"stage": "ppo"},
    )  # fmt: skip
    ck = train.load_stage(tmp_path / "stage", mesh=mesh)
    chex.assert_trees_all_close(jax.device_get(ck.params), jax.device_get(base), atol=0, rtol=0)
    chex.assert_trees_all_close(
        jax.device_get(ck.lora), jax.device_get(state.params["policy"]), atol=0, rtol=0
    )
    assert set(ck.adapter_sets) == {"critic", "reward"} and ck.adapter_sets["reward"][1] == sets["reward"]
    chex.assert_trees_all_close(
        jax.device_get(ck.adapter_sets["critic"][0]), jax.device_get(state.params["critic"]), atol=0, rtol=0
    )
    assert ck.adapter_sets["critic"][0]["layers_0"]["mlp"]["up_proj"]["lora_a"].sharding.spec[0] == "fsdp"


def test_a_mis_nested_adapter_tree_names_the_unmatched_path():
    spec = TINY_LLAMA
    params = models.init_params(spec, jax.random.PRNGKey(0))
    cfg = lora.LoraConfig(rank=2, alpha=2)
    ad = lora.init(spec, params, cfg, jax.random.PRNGKey(1))
    ids = jnp.ones((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="'model/layers_0/attn/q_proj' matches no layer"):
        models.forward(spec, params, ids, lora={"model": ad}, lora_config=cfg)
    bad = jax.tree.map(lambda x: x, ad)
    bad["layers_1"]["attn"]["v_proj"]["lora_b"] = jnp.zeros((2, 7))
    with pytest.raises(ValueError, match="'layers_1/attn/v_proj' has lora_a"):
        models.forward(spec, params, ids, lora=bad, lora_config=cfg)
