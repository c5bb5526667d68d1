"""LoRA: merge == adapter forward; peft loads our export with the same logits; only adapters train."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf import lora, models, train
from tests.models._hf_tiny import tiny_hf_causal_lm, tiny_hf_config
from tests.train._lm import lm_batch, lm_loss

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    hf_model, path = tiny_hf_causal_lm("llama2", tmp_path_factory.mktemp("hf"))
    spec, params = models.load_pretrained(path)
    return hf_model, path, spec, params


def _random_adapters(spec, params, cfg, seed=0):
    """Fresh adapters with ``lora_b`` set to random nonzero values (a zero B would prove nothing)."""
    ad = lora.init(spec, params, cfg, jax.random.PRNGKey(seed))
    keys = iter(jax.random.split(jax.random.PRNGKey(seed + 1), 100))
    return jax.tree_util.tree_map_with_path(
        lambda p, x: 0.2 * jax.random.normal(next(keys), x.shape) if p[-1].key == "lora_b" else x, ad
    )


def _inputs():
    r = np.random.default_rng(0)
    ids = r.integers(3, 128, (2, 9)).astype(np.int32)
    mask = np.ones((2, 9), np.int32)
    mask[1, :3] = 0  # left padding
    return ids, mask


def test_init_follows_peft():
    spec = models.ModelSpec.from_hf_config(tiny_hf_config("llama2").to_dict())
    params = models.abstract_params(spec)
    cfg = lora.LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj"))
    ad = lora.init(spec, params, cfg, jax.random.PRNGKey(0))
    a = ad["layers_0"]["attn"]["q_proj"]["lora_a"]
    assert a.shape == (32, 4) and float(jnp.abs(a).max()) <= 1 / np.sqrt(32)
    assert float(jnp.abs(a).max()) > 0.5 / np.sqrt(32)  # uniform over the whole Kaiming range
    assert float(jnp.abs(ad["layers_1"]["attn"]["v_proj"]["lora_b"]).max()) == 0.0
    assert sorted(ad["layers_0"]["attn"]) == ["q_proj", "v_proj"] and "mlp" not in ad["layers_0"]
    assert cfg.scale == 2.0 and lora.LoraConfig(rank=4, alpha=8, use_rslora=True).scale == 4.0
    hash(cfg)
    assert lora.LoraConfig.from_json(cfg.to_json()) == cfg


def test_target_resolution():
    spec = models.ModelSpec.from_hf_config(tiny_hf_config("llama2").to_dict())
    params = models.abstract_params(spec)
    pick = lambda *t: ["/".join(m) for m in lora.target_modules(spec, params, lora.LoraConfig(targets=t))]
    assert pick(r"layers_\d+/attn/(q|v)_proj") == pick("q_proj", "v_proj")
    assert set(pick(r"layers_1/mlp/.*")) == {f"layers_1/mlp/{n}_proj" for n in ("gate", "up", "down")}
    assert len(pick("all-linear")) == 2 * 7 and "lm_head" not in pick("all-linear")
    with pytest.raises(ValueError, match="matches no linear layer"):
        pick("qkv")
    # Hugging Face short names of another family (OPT: out_proj, fc1)
    opt = models.ModelSpec.from_hf_config(tiny_hf_config("opt").to_dict())
    got = lora.target_modules(opt, models.abstract_params(opt), lora.LoraConfig(targets=("out_proj", "fc1")))
    assert {"/".join(m) for m in got} == {
        f"layers_{i}/{n}" for i in range(2) for n in ("attn/o_proj", "mlp/up_proj")
    }


@pytest.mark.parametrize("rslora", [False, True])
def test_merge_and_peft_parity(llama, tmp_path, rslora):
    import torch
    import transformers
    from peft import PeftModel

    _, path, spec, params = llama
    cfg = lora.LoraConfig(rank=4, alpha=8, targets=("all-linear",), use_rslora=rslora)
    ad = _random_adapters(spec, params, cfg)
    ids, mask = _inputs()
    fwd = jax.jit(lambda p, a: models.forward(spec, p, ids, mask, lora=a, lora_config=cfg).logits)
    with_adapters = fwd(params, ad)
    base = fwd(params, None)
    merged = fwd(lora.merge(params, ad, cfg), None)
    m = mask.astype(bool)
    assert float(jnp.abs(with_adapters - base)[m].max()) > 1e-2  # the adapters matter
    np.testing.assert_allclose(np.asarray(merged)[m], np.asarray(with_adapters)[m], atol=1e-5)

    lora.save_peft(spec, ad, cfg, tmp_path / "adapter")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").float().eval()
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        ref = peft_model(
            input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)
        ).logits
    np.testing.assert_allclose(np.asarray(with_adapters)[m], ref.numpy()[m], atol=1e-4)

    loaded, cfg2 = lora.load_peft(spec, tmp_path / "adapter")
    assert cfg2.scale == cfg.scale and cfg2.rank == 4 and set(cfg2.targets) == set(ALL)
    chex.assert_trees_all_close(loaded, ad, atol=0, rtol=0)


def test_only_adapters_train(llama):
    _, _, spec, params = llama
    cfg = lora.LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"), dropout=0.1)
    ad = lora.init(spec, params, cfg, jax.random.PRNGKey(0))
    frozen_before = jax.device_get(params)
    opt = train.make_optimizer(train.OptimConfig(lr=1e-2, schedule="constant", weight_decay=0.1))
    state, _ = train.init_train_state(ad, opt, 0)
    # the optimizer holds adapter-shaped state only
    mu = state.opt_state[1][0].mu
    assert jax.tree.structure(mu) == jax.tree.structure(ad)
    step = train.jit_train_step(train.make_train_step(lm_loss(spec, lora_config=cfg), opt))
    for i in range(2):
        state, metrics = step(state, lm_batch(i), params)  # the base is an argument, not donated
    assert np.isfinite(float(metrics["loss"]))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), frozen_before)  # bit-identical, alive
    b = state.params["layers_0"]["attn"]["q_proj"]["lora_b"]
    assert float(jnp.abs(b).max()) > 0  # B left zero: the adapters moved


@pytest.mark.parametrize(
    "family, targets, rslora",
    [
        ("opt", ("all-linear",), False),
        ("gpt2", ("q_proj", "v_proj", "up_proj"), True),
        ("bloom", ("query_key_value", "dense_4h_to_h"), False),
    ],
)
def test_peft_parity_other_families(tmp_path, family, targets, rslora):
    """OPT (renamed modules), GPT-2 (Conv1D, fused c_attn: q and v only) and BLOOM (fused, head-interleaved
    query_key_value): peft's logits on our export equal ours, and load_peft gives the same function back."""
    import torch
    from peft import PeftModel

    hf_model, path = tiny_hf_causal_lm(family, tmp_path)
    spec, params = models.load_pretrained(path)
    cfg = lora.LoraConfig(rank=3, alpha=5, targets=targets, use_rslora=rslora)
    ad = _random_adapters(spec, params, cfg)
    ids, _ = _inputs()
    mask = np.ones_like(ids)  # no padding: HF GPT-2 numbers positions 0.. regardless of the mask
    fwd = jax.jit(
        lambda a, c: models.forward(spec, params, ids, mask, lora=a, lora_config=c).logits, static_argnums=1
    )
    ours = np.asarray(fwd(ad, cfg))
    lora.save_peft(spec, ad, cfg, tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(hf_model, tmp_path / "adapter").eval()
    with torch.no_grad():
        ref = peft_model(
            input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)
        ).logits
    m = mask.astype(bool)
    np.testing.assert_allclose(ours[m], ref.numpy()[m], atol=1e-4)
    loaded, cfg2 = lora.load_peft(spec, tmp_path / "adapter")
    np.testing.assert_allclose(np.asarray(fwd(loaded, cfg2))[m], ours[m], atol=1e-5)
