"""T5 family against Hugging Face transformers (PyTorch CPU, f32, eval): v1.0, v1.1/Flan-T5, UL2 shapes."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

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
        for path, arr in zip(ws.paths, ws.load([state[n] for n in ws.hf_names])):
            node = params
            for k in path[:-1]:
                node = node.setdefault(k, {})
            node[path[-1]] = jnp.asarray(arr)
    return params


def _state_from_params(spec: ModelSpec, params: dict) -> dict[str, np.ndarray]:
    state = {}
    for ws in t5.hf_weight_specs(spec):
        arrs = [np.asarray(functools.reduce(lambda n, k: n[k], p, params)) for p in ws.paths]
        state.update(zip(ws.hf_names, ws.save(arrs)))
    for copy_name, source in t5.hf_tied_copies(spec).items():
        state[copy_name] = state[source]
    return state


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


_forward = jax.jit(t5.forward, static_argnums=0, static_argnames=("attention_impl", "remat", "compute_dtype"))


@pytest.fixture(scope="module", params=list(CONFIGS))
def family(request):
    model = _hf_model(request.param)
    state = _state(model)
    spec = ModelSpec.from_hf_config(model.config.to_dict())
    spec = t5.spec_for_checkpoint(spec, state.keys(), state.__getitem__)
    return request.param, model, spec, _params_from_state(spec, state)


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
    params = t5.init_params(spec, jax.random.key(1))
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
    params = t5.init_params(spec, jax.random.key(2))
    models.save_pretrained(spec, params, str(tmp_path))
    reloaded = transformers.T5ForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    ids, mask, dec, dmask = _inputs()
    ours = _forward(spec, params, ids, mask, decoder_input_ids=dec, decoder_attention_mask=dmask).logits
    np.testing.assert_allclose(
        np.asarray(ours), _hf_logits(reloaded, ids, mask, dec, dmask), atol=1e-4, rtol=0
    )


@pytest.mark.parametrize("prefill", [1, 3])
def test_cached_decoding_equals_full_forward(family, prefill):
    name, model, spec, params = family
    if name == "flan_ul2":
        pytest.skip("cache path is family-independent; two variants cover it")
    ids, mask, dec, _ = _inputs()
    full = _forward(spec, params, ids, mask, decoder_input_ids=dec)
    enc = jax.jit(t5.encode, static_argnums=0)(spec, params, ids, mask)
    cache = t5.init_cache(spec, B, 12, jnp.float32, enc, mask, params)
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
    for a, x in zip(jax.tree.leaves(axes, is_leaf=lambda a: isinstance(a, tuple)), jax.tree.leaves(shapes)):
        assert len(a) == len(x.shape)
