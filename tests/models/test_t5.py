"""T5 family against Hugging Face transformers (PyTorch CPU, f32, eval): v1.0, v1.1/Flan-T5, UL2 shapes."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxrlhf import sharding  # noqa: E402
from jaxrlhf.models import t5  # noqa: E402
from jaxrlhf.models.spec import ModelSpec  # noqa: E402

V, B, S, T = 128, 3, 12, 9
ENC_LENS = (12, 7, 3)  # right padding
DEC_LENS = (9, 5, 2)

CONFIGS = {
    # T5 v1.0: relu MLP, tied head scaled by d_model**-0.5
    "t5_v1_0": dict(feed_forward_proj="relu", tie_word_embeddings=True, num_decoder_layers=2),
    # T5 v1.1 / Flan-T5: gated-gelu (gelu_new), untied head, no scaling; deeper decoder than encoder
    "flan_t5": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False, num_decoder_layers=3),
    # UL2 / Flan-UL2: gated-silu, untied
    "flan_ul2": dict(feed_forward_proj="gated-silu", tie_word_embeddings=False, num_decoder_layers=2),
}


def _hf_model(name: str):
    cfg = transformers.T5Config(
        vocab_size=V,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,  # S=12 reaches the log-spaced buckets
        dropout_rate=0.0,
        decoder_start_token_id=0,
        **CONFIGS[name],
    )
    torch.manual_seed(len(name))
    model = transformers.T5ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "layer_norm" in n:  # HF inits norm scales to 1: perturb them so the mapping is tested
                p.add_(0.2 * torch.randn_like(p))
        if not CONFIGS[name]["tie_word_embeddings"]:
            # transformers 5 ties every freshly built T5; untie like a loaded Flan-T5 checkpoint
            model.lm_head.weight = torch.nn.Parameter(torch.randn(V, 32))
    return model


def _state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _params_from_state(spec: ModelSpec, state: dict[str, np.ndarray]) -> dict:
    params: dict = {}
    for ws in t5.hf_weight_specs(spec):
        for path, arr in zip(ws.paths, ws.load([state[n] for n in ws.hf_names]), strict=True):
            node = params
            for k in path[:-1]:
                node = node.setdefault(k, {})
            node[path[-1]] = jnp.asarray(arr)
    return params


def _state_from_params(spec: ModelSpec, params: dict) -> dict[str, np.ndarray]:
    state = {}
    for ws in t5.hf_weight_specs(spec):
        arrs = [np.asarray(functools.reduce(lambda n, k: n[k], p, params)) for p in ws.paths]
        state.update(zip(ws.hf_names, ws.save(arrs), strict=True))
    for copy_name, source in t5.hf_tied_copies(spec).items():
        state[copy_name] = state[source]
    return state


def _random_params(spec: ModelSpec, seed: int) -> dict:
    """Random params of the right shapes, drawn in numpy (no per-spec compile of the jax initialiser)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda k: t5.init_params(spec, k), jax.random.key(0))

    def draw(x):
        if len(x.shape) == 1:  # norm scales
            return jnp.asarray(1.0 + 0.2 * rng.normal(size=x.shape), jnp.float32)
        return jnp.asarray(rng.normal(size=x.shape) * x.shape[0] ** -0.5, jnp.float32)

    return jax.tree.map(draw, shapes)


def _inputs():
    rng = np.random.default_rng(0)
    ids = rng.integers(1, V, (B, S))
    mask = (np.arange(S)[None] < np.array(ENC_LENS)[:, None]).astype(np.int64)
    dec = rng.integers(1, V, (B, T))
    dec[:, 0] = 0  # decoder_start_token_id
    dmask = (np.arange(T)[None] < np.array(DEC_LENS)[:, None]).astype(np.int64)
    return ids * mask, mask, dec * dmask, dmask


def _hf_logits(model, ids, mask, dec, dmask) -> np.ndarray:
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            decoder_input_ids=torch.tensor(dec),
            decoder_attention_mask=torch.tensor(dmask),
        )
    return out.logits.numpy()


_STATIC = ("attention_impl", "remat", "compute_dtype", "lora_config")
_forward = jax.jit(t5.forward, static_argnums=0, static_argnames=_STATIC)
_init = jax.jit(t5.init_params, static_argnums=(0, 2))


@functools.cache
def _family(name: str):
    """(name, HF model, spec, params loaded from the HF state dict); built once per module run."""
    model = _hf_model(name)
    state = _state(model)
    spec = ModelSpec.from_hf_config(model.config.to_dict())
    spec = t5.spec_for_checkpoint(spec, state.keys(), state.__getitem__)
    return name, model, spec, _params_from_state(spec, state)


@pytest.fixture(scope="module", params=list(CONFIGS))
def family(request):
    return _family(request.param)


def test_spec_matches_hf_variant(family):
    name, model, spec, params = family
    assert spec.tie_word_embeddings == CONFIGS[name]["tie_word_embeddings"]
    assert spec.scale_decoder_outputs == model.config.scale_decoder_outputs == (name == "t5_v1_0")
    assert spec.num_decoder_layers == CONFIGS[name]["num_decoder_layers"]
    assert ("lm_head" in params) == (not spec.tie_word_embeddings)


def test_logits_match_hf_padded_batch(family):
    name, model, spec, params = family
    ids, mask, dec, dmask = _inputs()
    ref = _hf_logits(model, ids, mask, dec, dmask)
    out = _forward(spec, params, ids, mask, decoder_input_ids=dec, decoder_attention_mask=dmask)
    assert out.logits.shape == (B, T, V) and out.encoder_hidden.shape == (B, S, 32)
    np.testing.assert_allclose(np.asarray(out.logits), ref, atol=1e-4, rtol=0)
    # real encoder positions of the encoder output match HF's encoder too
    with torch.no_grad():
        enc_ref = model.encoder(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)
        ).last_hidden_state
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(out.encoder_hidden)[real], enc_ref.numpy()[real], atol=1e-4, rtol=0)


def test_state_dict_round_trip_loads_strict_in_transformers(family):
    """Params we initialise -> HF state dict -> strict load into a fresh model -> same logits as ours."""
    name, model, spec, _ = family
    params = _random_params(spec, 1)
    state = _state_from_params(spec, params)
    fresh = transformers.T5ForConditionalGeneration(model.config).eval()
    if not spec.tie_word_embeddings:
        fresh.lm_head.weight = torch.nn.Parameter(torch.empty(V, 32))
    fresh.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=True)
    ids, mask, dec, dmask = _inputs()
    ours = _forward(spec, params, ids, mask, decoder_input_ids=dec, decoder_attention_mask=dmask).logits
    np.testing.assert_allclose(np.asarray(ours), _hf_logits(fresh, ids, mask, dec, dmask), atol=1e-4, rtol=0)


def test_save_pretrained_reloads_in_transformers(family, tmp_path):
    models = pytest.importorskip("jaxrlhf.models")
    if not hasattr(models, "save_pretrained"):
        pytest.skip("jaxrlhf.models.save_pretrained (hf_io) not available yet")
    name, model, spec, _ = family
    params = _random_params(spec, 2)
    models.save_pretrained(spec, params, str(tmp_path))
    reloaded = transformers.T5ForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    ids, mask, dec, dmask = _inputs()
    ours = _forward(spec, params, ids, mask, decoder_input_ids=dec, decoder_attention_mask=dmask).logits
    np.testing.assert_allclose(
        np.asarray(ours), _hf_logits(reloaded, ids, mask, dec, dmask), atol=1e-4, rtol=0
    )


def test_load_pretrained_from_transformers_save(family, tmp_path):
    """A directory written by transformers itself (v5 always writes tie_word_embeddings=true for T5)."""
    from jaxrlhf import models

    name, model, _, _ = family
    model.save_pretrained(str(tmp_path))
    spec, params = models.load_pretrained(str(tmp_path))
    assert spec.tie_word_embeddings == CONFIGS[name]["tie_word_embeddings"]
    ids, mask, dec, dmask = _inputs()
    ours = _forward(spec, params, ids, mask, decoder_input_ids=dec, decoder_attention_mask=dmask).logits
    np.testing.assert_allclose(np.asarray(ours), _hf_logits(model, ids, mask, dec, dmask), atol=1e-4, rtol=0)


def test_load_pretrained_full_state_dict_with_tied_copies(family, tmp_path):
    """Older checkpoints (e.g. the hub's Flan-T5) also carry encoder/decoder.embed_tokens copies."""
    import json

    from safetensors.numpy import save_file

    from jaxrlhf import models

    name, model, spec, params = family
    state = _state(model)
    state[t5.HF_IGNORED_KEYS[0]] = np.zeros((8, 4), np.float32)
    save_file(state, str(tmp_path / "model.safetensors"))
    config = model.config.to_dict()
    config["tie_word_embeddings"] = CONFIGS[name]["tie_word_embeddings"]  # as transformers 4 wrote it
    config.pop("scale_decoder_outputs")
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded_spec, loaded = models.load_pretrained(str(tmp_path))
    assert loaded_spec == spec
    jax.tree.map(np.testing.assert_array_equal, loaded, params)


@pytest.mark.parametrize("name, prefill", [("t5_v1_0", 1), ("flan_t5", 3)])
def test_cached_decoding_equals_full_forward(name, prefill):
    """Encoder once, then a prefill of ``prefill`` decoder tokens and one token per step."""
    _, _, spec, params = _family(name)
    ids, mask, dec, _ = _inputs()
    full = _forward(spec, params, ids, mask, decoder_input_ids=dec, decoder_attention_mask=np.ones_like(dec))
    cache = t5.init_cache(spec, B, 12, jnp.float32, full.encoder_hidden, mask, params)
    steps = [dec[:, :prefill]] + [dec[:, t : t + 1] for t in range(prefill, T)]
    got = []
    for chunk in steps:
        out = _forward(spec, params, None, None, decoder_input_ids=chunk, cache=cache)
        cache = out.cache
        got.append(np.asarray(out.logits))
    assert (
        int(cache["index"]) == T
        and bool(cache["valid"][:, :T].all())
        and not bool(cache["valid"][:, T:].any())
    )
    np.testing.assert_allclose(np.concatenate(got, axis=1), np.asarray(full.logits), atol=1e-5, rtol=0)


def test_precomputed_encoder_outputs_and_bf16_compute(flan):
    spec, params = flan
    ids, mask, dec, dmask = _inputs()
    kw = dict(decoder_input_ids=dec, decoder_attention_mask=dmask)
    full = _forward(spec, params, ids, mask, **kw)
    reused = _forward(spec, params, None, mask, encoder_outputs=full.encoder_hidden, **kw)
    np.testing.assert_allclose(np.asarray(reused.logits), np.asarray(full.logits), atol=1e-6, rtol=0)

    low = _forward(spec, params, ids, mask, compute_dtype=jnp.bfloat16, **kw)
    assert low.logits.dtype == jnp.float32 and low.hidden.dtype == jnp.bfloat16
    err = np.abs(np.asarray(low.logits) - np.asarray(full.logits)).max()
    assert err < 0.05 * np.abs(np.asarray(full.logits)).max(), err


def test_flan_t5_xl_param_count_abstract():
    spec = ModelSpec.from_hf_config(
        dict(
            model_type="t5",
            vocab_size=32128,
            d_model=2048,
            d_ff=5120,
            d_kv=64,
            num_layers=24,
            num_decoder_layers=24,
            num_heads=32,
            feed_forward_proj="gated-gelu",
            tie_word_embeddings=False,
        )
    )
    shapes = jax.eval_shape(lambda k: t5.init_params(spec, k, jnp.bfloat16), jax.random.key(0))
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    assert abs(n - 2.85e9) / 2.85e9 < 0.01, n
    axes = t5.param_axes(spec)
    assert jax.tree.structure(axes, is_leaf=lambda a: isinstance(a, tuple)) == jax.tree.structure(shapes)
    axes_leaves = jax.tree.leaves(axes, is_leaf=lambda a: isinstance(a, tuple))
    for a, x in zip(axes_leaves, jax.tree.leaves(shapes), strict=True):
        assert len(a) == len(x.shape)


class _LoraCfg(NamedTuple):
    scale: float
    dropout: float


def _get(tree, path):
    return functools.reduce(lambda n, k: n[k], path, tree)


@pytest.fixture(scope="module")
def flan():
    return _family("flan_t5")[2:]


def test_lora_equals_merged_weights_and_cache(flan):
    """forward(lora) == forward(W + scale * a @ b), also through the cache (cross-attn k adapter)."""
    spec, params = flan
    cfg = _LoraCfg(scale=0.5, dropout=0.0)
    targets = [
        ("encoder", "layers_0", "attn", "q_proj"),
        ("encoder", "layers_1", "mlp", "down_proj"),
        ("decoder", "layers_2", "attn", "v_proj"),
        ("decoder", "layers_0", "cross_attn", "k_proj"),
        ("decoder", "layers_1", "mlp", "gate_proj"),
        ("lm_head",),
    ]
    rng = np.random.default_rng(3)
    lora, merged = {}, jax.tree.map(lambda x: x, params)
    for path in targets:
        w = _get(params, path)["kernel"]
        a = jnp.asarray(rng.normal(size=(w.shape[0], 4)), jnp.float32)
        b = jnp.asarray(rng.normal(size=(4, w.shape[1])) * 0.1, jnp.float32)
        node = lora
        for k in path:
            node = node.setdefault(k, {})
        node.update(lora_a=a, lora_b=b)
        _get(merged, path)["kernel"] = w + cfg.scale * a @ b
    ids, mask, dec, dmask = _inputs()
    kw = dict(decoder_input_ids=dec, decoder_attention_mask=dmask)
    ref = np.asarray(_forward(spec, merged, ids, mask, **kw).logits)
    base = np.asarray(_forward(spec, params, ids, mask, **kw).logits)
    got = _forward(spec, params, ids, mask, lora=lora, lora_config=cfg, **kw)
    assert np.abs(ref - base).max() > 1e-2  # the adapters matter
    np.testing.assert_allclose(np.asarray(got.logits), ref, atol=1e-4, rtol=0)

    cache = t5.init_cache(
        spec, B, T, jnp.float32, got.encoder_hidden, mask, params, lora=lora, lora_config=cfg
    )
    out = _forward(spec, params, None, None, lora=lora, lora_config=cfg, cache=cache, **kw)
    np.testing.assert_allclose(np.asarray(out.logits), ref, atol=1e-4, rtol=0)


def test_lora_peft_export_matches_peft_on_transformers(flan, tmp_path):
    """All-linear LoRA on Flan-T5: our forward == peft's LoRA on the HF model after lora.save_peft."""
    import copy

    peft = pytest.importorskip("peft")
    from jaxrlhf import lora as lora_lib

    spec, params = flan
    cfg = lora_lib.LoraConfig(rank=4, alpha=8.0, targets=("all-linear",))
    adapters = lora_lib.init(spec, params, cfg, jax.random.key(0))
    rng = np.random.default_rng(11)
    adapters = jax.tree.map(lambda x: x + jnp.asarray(0.1 * rng.normal(size=x.shape), x.dtype), adapters)
    assert "lora_a" in adapters["decoder"]["layers_2"]["cross_attn"]["k_proj"]
    ids, mask, dec, dmask = _inputs()
    ours = _forward(
        spec,
        params,
        ids,
        mask,
        decoder_input_ids=dec,
        decoder_attention_mask=dmask,
        lora=adapters,
        lora_config=cfg,
    ).logits
    lora_lib.save_peft(spec, adapters, cfg, tmp_path / "adapter")
    hf = copy.deepcopy(_family("flan_t5")[1])
    ref = _hf_logits(
        peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval(), ids, mask, dec, dmask
    )
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=0)


def test_lora_dropout_closed_form():
    """dense(): y = x W + scale * (keep * x / (1 - p)) a b, keep ~ Bernoulli(1 - p) from the given key."""
    from jaxrlhf.models import _t5_layers as layers

    rng = np.random.default_rng(9)
    x = jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.float32)
    w, a, b = (jnp.asarray(rng.normal(size=sh), jnp.float32) for sh in ((8, 6), (8, 2), (2, 6)))
    cfg = _LoraCfg(scale=0.25, dropout=0.3)
    key = jax.random.key(1)
    got = layers.dense(x, {"kernel": w}, {"lora_a": a, "lora_b": b}, cfg, key)
    keep = np.asarray(jax.random.bernoulli(key, 0.7, x.shape))
    want = np.asarray(x) @ np.asarray(w) + 0.25 * ((np.asarray(x) * keep / 0.7) @ np.asarray(a)) @ np.asarray(
        b
    )
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)
    no_rng = layers.dense(x, {"kernel": w}, {"lora_a": a, "lora_b": b}, cfg, None)  # eval: no dropout
    np.testing.assert_allclose(
        np.asarray(no_rng), np.asarray(x @ w + 0.25 * (x @ a) @ b), atol=1e-5, rtol=1e-5
    )


def test_packed_segments_equal_separate_examples(flan):
    """Two examples packed in one row (segment ids, reset positions) give each example's own logits."""
    spec, params = flan
    rng = np.random.default_rng(5)
    enc_lens, dec_lens = (5, 6), (4, 3)
    enc = [rng.integers(1, V, n) for n in enc_lens]
    dec = [np.concatenate([[0], rng.integers(1, V, n - 1)]) for n in dec_lens]

    def pad(xs, n):
        return np.stack([np.pad(x, (0, n - len(x))) for x in xs]), np.stack(
            [np.arange(n) < len(x) for x in xs]
        ).astype(np.int32)

    ids, mask = pad(enc, sum(enc_lens))
    dids, dmask = pad(dec, sum(dec_lens))
    separate = np.asarray(
        _forward(spec, params, ids, mask, decoder_input_ids=dids, decoder_attention_mask=dmask).logits
    )

    seg_e = np.concatenate([np.full(n, i + 1) for i, n in enumerate(enc_lens)])[None]
    seg_d = np.concatenate([np.full(n, i + 1) for i, n in enumerate(dec_lens)])[None]
    pos_e = np.concatenate([np.arange(n) for n in enc_lens])[None]
    pos_d = np.concatenate([np.arange(n) for n in dec_lens])[None]
    packed = _forward(
        spec,
        params,
        np.concatenate(enc)[None],
        np.ones_like(seg_e),
        decoder_input_ids=np.concatenate(dec)[None],
        positions=(pos_e, pos_d),
        segment_ids=(seg_e, seg_d),
    ).logits
    want = np.concatenate([separate[0, : dec_lens[0]], separate[1, : dec_lens[1]]])
    np.testing.assert_allclose(np.asarray(packed)[0], want, atol=1e-4, rtol=0)


def test_remat_and_fused_attention_keep_values_and_grads(flan):
    spec = flan[0].replace(num_layers=1, num_decoder_layers=1)  # one layer per stack keeps compiles short
    params = _init(spec, jax.random.key(4))
    # HF's init scales: unit norms, shared ~ N(0, 1), k_proj ~ N(0, 1/E)
    assert float(params["encoder"]["final_norm"]["scale"].min()) == 1.0
    assert abs(float(params["shared"]["embedding"].std()) - 1.0) < 0.1
    assert abs(float(params["encoder"]["layers_0"]["attn"]["k_proj"]["kernel"].std()) * 32**0.5 - 1.0) < 0.1
    ids, mask, dec, dmask = _inputs()
    w = jnp.asarray(np.random.default_rng(7).normal(size=(B, T, V)), jnp.float32)

    def loss(p, remat, impl):
        out = t5.forward(
            spec,
            p,
            ids,
            mask,
            decoder_input_ids=dec,
            decoder_attention_mask=dmask,
            remat=remat,
            attention_impl=impl,
        )
        return jnp.sum(out.logits * w)

    grad = jax.jit(jax.value_and_grad(loss), static_argnums=(1, 2))
    ref_v, ref_g = grad(params, "none", "plain")
    for remat, impl in (("save_dots", "fused"),):
        v, g = grad(params, remat, impl)
        np.testing.assert_allclose(float(v), float(ref_v), rtol=1e-5)
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref_g), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4)


def test_sharded_forward_on_8_devices(flan):
    spec, params = flan
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    sharded = sharding.shard_params(params, t5.param_axes(spec), mesh)
    q = sharded["decoder"]["layers_0"]["cross_attn"]["q_proj"]["kernel"]
    assert not sharding.is_fully_replicated(q)
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    ids, mask, dec, dmask = _inputs()
    ids, mask, dec, dmask = (
        np.concatenate([x, x[:1]]) for x in (ids, mask, dec, dmask)
    )  # batch 4 over data*fsdp
    batch = sharding.shard_batch(dict(ids=ids, mask=mask, dec=dec, dmask=dmask), mesh)
    out = _forward(
        spec,
        sharded,
        batch["ids"],
        batch["mask"],
        decoder_input_ids=batch["dec"],
        decoder_attention_mask=batch["dmask"],
        remat="full",
    )
    assert not sharding.is_fully_replicated(out.logits)
    ref = _hf_logits(_family("flan_t5")[1], ids, mask, dec, dmask)
    np.testing.assert_allclose(np.asarray(out.logits), ref, atol=1e-4, rtol=0)


def test_bad_inputs_raise_clear_errors(flan):
    spec, params = flan
    ids, mask, dec, _ = _inputs()
    with pytest.raises(ValueError, match="decoder_input_ids"):
        t5.forward(spec, params, ids, mask, decoder_input_ids=None)
    with pytest.raises(ValueError, match="pair"):
        t5.forward(spec, params, ids, mask, decoder_input_ids=dec, positions=np.zeros((B, T), np.int32))
    with pytest.raises(ValueError, match="model_type 't5'"):
        t5.init_params(spec.replace(model_type="llama"), jax.random.key(0))
    with pytest.raises(ValueError, match="attention_impl"):
        t5.forward(spec, params, ids, mask, decoder_input_ids=dec, attention_impl="flash")
