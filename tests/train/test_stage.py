"""Stage checkpoints: everything the next stage needs round-trips; sharded load; atomic replacement."""

import json
import os

import chex
import jax
import numpy as np

from jaxrlhf import lora, models, sharding, train
from tests.train._lm import TINY_LLAMA


def _tokenizer_dir(tmp_path):
    d = tmp_path / "tok"
    d.mkdir()
    (d / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": "{{ messages }}", "eos_token": "</s>"})
    )
    (d / "tokenizer.json").write_text("{}")
    return d


def test_stage_round_trip_and_sharded_load(tmp_path):
    spec = TINY_LLAMA
    params = models.init_params(spec, jax.random.PRNGKey(0))
    cfg = lora.LoraConfig(rank=2, alpha=4, targets=("q_proj", "v_proj"))
    ad = lora.init(spec, params, cfg, jax.random.PRNGKey(1))
    head = {"kernel": np.arange(32, dtype=np.float32).reshape(32, 1)}
    out = tmp_path / "sft"
    train.save_stage(
        out,
        spec,
        params,
        lora=ad,
        lora_config=cfg,
        tokenizer_dir=_tokenizer_dir(tmp_path),
        stage_info={"stage": "sft", "steps": 3},
        extras={"reward_head": head},
        json_extras={"reward_stats": {"mean": 0.5, "std": 2.0}},
    )
    assert sorted(os.listdir(tmp_path)) == ["sft", "tok"]  # no temp dirs left behind
    ck = train.load_stage(out, extras=("reward_head",))
    assert ck.spec == spec and ck.lora_config == cfg and ck.stage_info == {"stage": "sft", "steps": 3}
    chex.assert_trees_all_close(ck.params, params, atol=0, rtol=0)
    chex.assert_trees_all_close(ck.lora, ad, atol=0, rtol=0)
    np.testing.assert_array_equal(ck.extras["reward_head"]["kernel"], head["kernel"])
    assert ck.extras["reward_stats"] == {"mean": 0.5, "std": 2.0}
    with open(os.path.join(ck.tokenizer_dir, "tokenizer_config.json")) as f:
        assert json.load(f)["chat_template"] == "{{ messages }}"

    mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
    sharded = train.load_stage(out, mesh=mesh)
    q = sharded.params["layers_0"]["attn"]["q_proj"]["kernel"]
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor") and len(q.sharding.device_set) == 8
    chex.assert_trees_all_close(jax.device_get(sharded.params), params, atol=0, rtol=0)
    assert sharded.lora["layers_0"]["attn"]["q_proj"]["lora_a"].sharding.spec[0] == "fsdp"

    # replacing a stage checkpoint is atomic: the new one appears whole, the old one disappears
    train.save_stage(out, spec, params, stage_info={"stage": "rm"})
    assert sorted(os.listdir(tmp_path)) == ["sft", "tok"]
    again = train.load_stage(out)
    assert again.stage_info == {"stage": "rm"} and again.lora is None and again.tokenizer_dir is None
    # a crash between "move old aside" and "rename new in" leaves only <dir>.old-*: still loadable
    os.rename(out, f"{out}.old-1-2")
    assert train.load_stage(out).stage_info == {"stage": "rm"}
