"""generation.generate against transformers' greedy generate, against models.forward, sharded, bucketed."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxrlhf import generation, models, sharding  # noqa: E402
from jaxrlhf.generation import SamplingConfig  # noqa: E402
from tests._jaxpr import all_eqns  # noqa: E402
from tests.models._hf_tiny import VOCAB, padded_batch, tiny_hf_causal_lm  # noqa: E402

NEW = 20
LENGTHS = [3, 7, 5]  # unequal prompts, left-padded to 7
FAMILIES = ["llama3", "mistral", "opt", "bloom", "gpt2"]  # + T5 below; llama2 / OPT-350m: tests/models


@functools.cache
def _forward(spec):
    return jax.jit(functools.partial(models.forward, spec))


def _hf_greedy(model, ids, mask, eos, min_new=0, **kw):
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.as_tensor(ids, dtype=torch.long),
            attention_mask=torch.as_tensor(mask, dtype=torch.long),
            max_new_tokens=NEW,
            min_new_tokens=min_new,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=eos,
            return_dict_in_generate=True,
            output_logits=True,
            **kw,
        )
    seq = out.sequences.numpy()
    gen = seq[:, -len(out.logits) :] if not model.config.is_encoder_decoder else seq[:, 1:]
    logits = torch.stack(out.logits, 1).float().numpy()  # [B, steps, V] raw model logits
    width = gen.shape[1]
    gen = np.pad(gen, ((0, 0), (0, NEW - width)))  # HF stops once every row is done: pad like we do
    return gen, logits


def _eos_from_continuation(model, ids, mask, **kw):
    """A stop token that greedy decoding really emits: row 0's 6th token (rows stop at different steps)."""
    full, _ = _hf_greedy(model, ids, mask, eos=2, min_new=NEW, **kw)
    return int(full[0, 5])


def _check_against_hf(result, hf_tokens, hf_logits, eos):
    tokens, mask = np.asarray(result.tokens), np.asarray(result.mask)
    np.testing.assert_array_equal(tokens, hf_tokens)
    for b in range(tokens.shape[0]):
        stops = np.nonzero(tokens[b] == eos)[0]
        n_valid = stops[0] + 1 if stops.size else NEW
        np.testing.assert_array_equal(mask[b], np.arange(NEW) < n_valid, err_msg=f"row {b}")
        assert int(result.lengths[b]) == n_valid
        assert (tokens[b, n_valid:] == 0).all() and (np.asarray(result.raw_logprobs)[b, n_valid:] == 0).all()
        # raw log-probs are the log-softmax of transformers' own logits at each step
        ref = torch.log_softmax(torch.as_tensor(hf_logits[b, :n_valid]), -1).numpy()
        np.testing.assert_allclose(
            np.asarray(result.raw_logprobs)[b, :n_valid],
            ref[np.arange(n_valid), tokens[b, :n_valid]],
            atol=2e-5,
        )
    assert not mask.all(), "the chosen stop token should end at least one row early"


@pytest.fixture(scope="module")
def tmp_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("gen")


@pytest.fixture(scope="module")
def llama(tmp_dir):
    hf, path = tiny_hf_causal_lm("llama3", tmp_dir)
    spec, params = models.load_pretrained(path)
    return hf, spec, params


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_transformers_and_forward(family, tmp_dir):
    hf, path = tiny_hf_causal_lm(family, tmp_dir)
    spec, params = models.load_pretrained(path)
    ids, mask = padded_batch(np.random.default_rng(0), LENGTHS, max(LENGTHS))
    eos = _eos_from_continuation(hf, ids, mask)
    hf_tokens, hf_logits = _hf_greedy(hf, ids, mask, eos)
    cfg = SamplingConfig(max_new_tokens=NEW, temperature=0.0, stop_token_ids=(eos,), pad_token_id=0)
    result = generation.generate(spec, params, ids, mask, jax.random.key(0), cfg)
    _check_against_hf(result, hf_tokens, hf_logits, eos)

    # raw log-probs are what a training forward over prompt ++ completion recomputes
    seq, seq_mask = result.sequences()
    logits = _forward(spec)(params, seq, seq_mask).logits
    p = result.prompt_ids.shape[1]
    logp = jax.nn.log_softmax(logits[:, p - 1 : -1], axis=-1)
    recomputed = jnp.take_along_axis(logp, result.tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(
        np.where(result.mask, recomputed, 0), np.asarray(result.raw_logprobs), atol=1e-5, rtol=0
    )
    np.testing.assert_allclose(np.asarray(result.logprobs), np.asarray(result.raw_logprobs), atol=1e-6)


def _tiny_t5(tmp_dir):
    cfg = transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0,
        pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for _, prm in model.named_parameters():
            prm.add_(0.1 * torch.randn_like(prm))
        model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, 32))  # untied, like Flan-T5
    model.config.tie_word_embeddings = False  # transformers 5 ties fresh T5s: untie in the saved config too
    path = str(tmp_dir / "hf_t5")
    model.save_pretrained(path)
    return model, path


def test_t5_greedy_equals_transformers_and_forward(tmp_dir):
    hf, path = _tiny_t5(tmp_dir)
    spec, params = models.load_pretrained(path)
    ids, mask = padded_batch(np.random.default_rng(1), [9, 4, 6], 9, side="right")
    eos = _eos_from_continuation(hf, ids, mask)
    hf_tokens, hf_logits = _hf_greedy(hf, ids, mask, eos)
    cfg = SamplingConfig(max_new_tokens=NEW, temperature=0.0, stop_token_ids=(eos,), pad_token_id=0)
    result = generation.generate(spec, params, ids, mask, jax.random.key(0), cfg)
    _check_against_hf(result, hf_tokens, hf_logits, eos)

    dec_in = result.decoder_input_ids(spec.decoder_start_token_id)
    out = _forward(spec)(params, result.prompt_ids, result.prompt_mask, decoder_input_ids=dec_in)
    logp = jax.nn.log_softmax(out.logits, axis=-1)
    recomputed = jnp.take_along_axis(logp, result.tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.where(result.mask, recomputed, 0), result.raw_logprobs, atol=1e-5, rtol=0)


def test_sampling_logprobs_match_forward_and_n_samples(llama):
    _, spec, params = llama
    ids, mask = padded_batch(np.random.default_rng(2), [4, 6], 6)
    cfg = SamplingConfig(max_new_tokens=12, temperature=0.9, top_k=20, top_p=0.9, n=3, stop_token_ids=(5, 9))
    result = generation.generate(spec, params, ids, mask, jax.random.key(7), cfg)
    assert result.tokens.shape == (6, 12) and result.prompt_ids.shape[0] == 6
    # rows b*n .. b*n+n-1 share prompt b; different samples differ
    np.testing.assert_array_equal(np.asarray(result.prompt_ids[0]), np.asarray(result.prompt_ids[2]))
    assert (np.asarray(result.tokens[0]) != np.asarray(result.tokens[1])).any()
    seq, seq_mask = result.sequences()
    logits = _forward(spec)(params, seq, seq_mask).logits[:, result.prompt_ids.shape[1] - 1 : -1]
    tok = result.tokens[..., None]
    raw = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), tok, -1)[..., 0]
    valid = np.asarray(result.mask)
    np.testing.assert_allclose(np.where(valid, raw, 0), result.raw_logprobs, atol=1e-5, rtol=0)
    # sampling log-probs: the truncated distribution recomputed from the forward's logits
    probs = generation.sampling_probs(logits.reshape(-1, logits.shape[-1]), cfg).reshape(logits.shape)
    samp = jnp.log(jnp.take_along_axis(probs, tok, -1)[..., 0])
    np.testing.assert_allclose(np.where(valid, samp, 0), result.logprobs, atol=1e-5, rtol=0)
    assert np.isfinite(np.asarray(result.logprobs)).all()


def test_stream_yields_what_generate_returns(llama):
    _, spec, params = llama
    ids, mask = padded_batch(np.random.default_rng(3), [2, 5], 5)
    cfg = SamplingConfig(max_new_tokens=11, temperature=1.0, stop_token_ids=())
    full = generation.generate(spec, params, ids, mask, jax.random.key(4), cfg)
    chunks = list(generation.stream(spec, params, ids, mask, jax.random.key(4), cfg, chunk=4))
    assert [c[0].shape[1] for c in chunks] == [4, 4, 3]
    np.testing.assert_array_equal(np.concatenate([c[0] for c in chunks], 1), full.tokens)
    np.testing.assert_array_equal(np.concatenate([c[1] for c in chunks], 1), full.mask)


def test_single_row_decoded_as_two_rows_gives_the_same_result(llama, monkeypatch):
    """The GPU path (batch 1 padded to 2 rows, see generation._MIN_DECODE_ROWS) forced on the CPU."""
    _, spec, params = llama
    ids, mask = padded_batch(np.random.default_rng(5), [6], 6)
    cfg = SamplingConfig(max_new_tokens=10, temperature=1.0, top_k=30, stop_token_ids=(5, 9))
    greedy = SamplingConfig(max_new_tokens=10, temperature=0.0, stop_token_ids=(5, 9))
    plain = [generation.generate(spec, params, ids, mask, jax.random.key(8), c) for c in (cfg, greedy)]
    monkeypatch.setattr(generation, "_MIN_DECODE_ROWS", {jax.default_backend(): 2})
    m, _, pids, _, rows = generation._setup(spec, ids, mask, cfg, None, None, None, None, "plain", None, None)
    assert pids.shape[0] == 2 and rows == 1 and m.live_rows == 1
    padded = [generation.generate(spec, params, ids, mask, jax.random.key(8), c) for c in (cfg, greedy)]
    for a, b in zip(plain, padded, strict=True):
        for name in a._fields:
            x, y = np.asarray(getattr(a, name)), np.asarray(getattr(b, name))
            assert x.shape == y.shape, name
            if name.endswith("logprobs"):
                np.testing.assert_allclose(x, y, atol=1e-5, err_msg=name)
            else:
                np.testing.assert_array_equal(x, y, err_msg=name)
    chunks = list(generation.stream(spec, params, ids, mask, jax.random.key(8), cfg, chunk=4))
    np.testing.assert_array_equal(np.concatenate([c[0] for c in chunks], 1), plain[0].tokens)
    np.testing.assert_array_equal(np.concatenate([c[1] for c in chunks], 1), plain[0].mask)


@pytest.mark.parametrize("family", ["llama3", "mistral", "bloom"])
def test_decode_phases_over_a_growing_cache_give_the_same_result(family, tmp_dir):
    """kv_segments=3: three decode loops over caches of P+11, P+22, P+32 slots == one loop over P+32."""
    _, path = tiny_hf_causal_lm(family, tmp_dir)
    spec, params = models.load_pretrained(path)
    ids, mask = padded_batch(np.random.default_rng(6), [3, 7, 5], 7)
    assert generation._segment_ends(32, 3) == (11, 22, 32)
    assert generation._kv_segments(spec, SamplingConfig(max_new_tokens=256), None) == 4
    assert generation._kv_segments(spec, SamplingConfig(max_new_tokens=128), None) == 1
    # three while loops whose carried KV caches have P+11, P+22, P+32 slots (P = prompt bucket 8)
    m, rcfg, pids, pmask, _ = generation._setup(
        spec, ids, mask, SamplingConfig(max_new_tokens=30), None, None, None, None, "plain", None, None, 3
    )
    jaxpr = jax.make_jaxpr(lambda *a: generation._generate_jit(m, rcfg, *a))(
        params, pids, pmask, jax.random.key(0), jnp.int32(30), None
    )
    loops = [e for e in all_eqns(jaxpr.jaxpr) if e.primitive.name == "while"]
    slots = [sorted({v.aval.shape[1] for v in e.outvars if v.aval.ndim == 4}) for e in loops]
    assert slots == [[8 + 11], [8 + 22], [8 + 32]], slots
    for cfg in (
        SamplingConfig(max_new_tokens=30, temperature=0.0, stop_token_ids=()),
        SamplingConfig(max_new_tokens=30, temperature=1.0, top_p=0.95, stop_token_ids=(5,)),
    ):
        one, three = (
            generation.generate(spec, params, ids, mask, jax.random.key(9), cfg, kv_segments=k)
            for k in (1, 3)
        )
        np.testing.assert_array_equal(np.asarray(one.tokens), np.asarray(three.tokens))
        np.testing.assert_array_equal(np.asarray(one.mask), np.asarray(three.mask))
        np.testing.assert_allclose(one.raw_logprobs, three.raw_logprobs, atol=1e-5)
        np.testing.assert_allclose(one.logprobs, three.logprobs, atol=1e-5)


def test_decode_loop_reads_weights_in_the_compute_dtype(llama):
    """f32 master weights with bf16 compute: the kernels / embeddings are cast once before the while loop
    (each decode step then reads bf16 weights), and the result equals decoding bf16-cast weights."""
    _, spec, params = llama
    ids, mask = padded_batch(np.random.default_rng(2), [3, 7, 5], 7)
    cfg = SamplingConfig(max_new_tokens=12, temperature=1.0, stop_token_ids=())
    m, rcfg, pids, pmask, _ = generation._setup(
        spec, ids, mask, cfg, None, None, jnp.bfloat16, None, "plain", None, None, 1
    )
    jaxpr = jax.make_jaxpr(lambda *a: generation._generate_jit(m, rcfg, *a))(
        params, pids, pmask, jax.random.key(0), jnp.int32(12), None
    )
    (loop,) = [e for e in all_eqns(jaxpr.jaxpr) if e.primitive.name == "while"]
    weight_shapes = {x.shape for x in jax.tree.leaves(params) if x.ndim == 2}
    body = loop.params["body_jaxpr"].jaxpr
    casts = [
        e.invars[0].aval.shape
        for e in all_eqns(body)
        if e.primitive.name == "convert_element_type" and e.invars[0].aval.dtype == jnp.float32
        and e.invars[0].aval.shape in weight_shapes
    ]  # fmt: skip
    assert not casts, f"the decode loop converts f32 weights of shapes {casts} at every step"
    in_body = {v.aval.dtype for v in body.invars if v.aval.shape in weight_shapes}
    assert in_body == {jnp.dtype(jnp.bfloat16)}, in_body
    cast = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.ndim >= 2 else x, params)
    a, b = (
        generation.generate(spec, p, ids, mask, jax.random.key(4), cfg, compute_dtype=jnp.bfloat16)
        for p in (params, cast)
    )
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    np.testing.assert_array_equal(np.asarray(a.raw_logprobs), np.asarray(b.raw_logprobs))


def test_right_padding_and_lora_adapters(llama):
    _, spec, params = llama
    left, lmask = padded_batch(np.random.default_rng(5), [3, 6], 6)
    right = np.zeros_like(left)
    rmask = np.zeros_like(lmask)
    for b in range(2):
        real = left[b][lmask[b] == 1]
        right[b, : len(real)], rmask[b, : len(real)] = real, 1
    cfg = SamplingConfig(max_new_tokens=8, temperature=0.0, stop_token_ids=())
    a = generation.generate(spec, params, left, lmask, jax.random.key(0), cfg)
    b = generation.generate(spec, params, right, rmask, jax.random.key(0), cfg)
    np.testing.assert_array_equal(a.tokens, b.tokens)

    # adapters on q/v projections == the same model with merged kernels
    class Cfg:
        scale, dropout = 2.0, 0.0

    rs = np.random.RandomState(0)
    lora, merged = {}, jax.tree.map(lambda x: x, params)
    for i in range(spec.num_layers):
        for name in ("q_proj", "v_proj"):
            kernel = params[f"layers_{i}"]["attn"][name]["kernel"]
            a_ = jnp.asarray(rs.randn(kernel.shape[0], 2).astype(np.float32) * 0.3)
            b_ = jnp.asarray(rs.randn(2, kernel.shape[1]).astype(np.float32) * 0.3)
            lora.setdefault(f"layers_{i}", {}).setdefault("attn", {})[name] = {"lora_a": a_, "lora_b": b_}
            merged[f"layers_{i}"]["attn"][name] = dict(
                merged[f"layers_{i}"]["attn"][name], kernel=kernel + 2.0 * a_ @ b_
            )
    with_lora = generation.generate(
        spec, params, left, lmask, jax.random.key(0), cfg, lora=lora, lora_config=Cfg()
    )
    with_merged = generation.generate(spec, merged, left, lmask, jax.random.key(0), cfg)
    np.testing.assert_array_equal(with_lora.tokens, with_merged.tokens)
    np.testing.assert_allclose(with_lora.raw_logprobs, with_merged.raw_logprobs, atol=1e-5)
    assert (np.asarray(with_lora.tokens) != np.asarray(a.tokens)).any()


def test_compilations_are_bounded_by_buckets(llama):
    _, spec, params = llama
    before = generation._generate_jit._cache_size()
    rng = np.random.default_rng(6)
    # prompt widths fall in buckets 8 and 16, generation lengths in bucket 8: two executables for six calls
    for width, new in [(5, 5), (7, 6), (6, 3), (12, 5), (16, 8), (9, 7)]:
        ids, mask = padded_batch(rng, [width - 1, width], width)
        # pad_token_id=3: a static config no other test uses, so every compilation here is counted
        cfg = SamplingConfig(max_new_tokens=new, temperature=0.0, stop_token_ids=(), pad_token_id=3)
        out = generation.generate(spec, params, ids, mask, jax.random.key(0), cfg)
        assert out.tokens.shape == (2, new) and out.prompt_ids.shape[1] == (8 if width <= 8 else 16)
    assert generation._generate_jit._cache_size() - before == 2


def test_sharded_generation_equals_unsharded(llama):
    _, spec, params = llama
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    sparams = sharding.shard_params(params, models.param_axes(spec), mesh)
    assert not all(x.sharding.is_fully_replicated for x in jax.tree.leaves(sparams))
    ids, mask = padded_batch(np.random.default_rng(8), [3, 7, 5, 6], 7)
    cfg = SamplingConfig(max_new_tokens=10, temperature=0.8, top_k=30, stop_token_ids=(11,))
    ref = generation.generate(spec, params, ids, mask, jax.random.key(1), cfg)
    sids, smask = sharding.shard_batch((jnp.asarray(ids), jnp.asarray(mask)), mesh)
    out = generation.generate(spec, sparams, sids, smask, jax.random.key(1), cfg, mesh=mesh)
    assert not out.tokens.sharding.is_fully_replicated
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_array_equal(out.mask, ref.mask)
    np.testing.assert_allclose(out.raw_logprobs, ref.raw_logprobs, atol=1e-5)
    np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-5)


def test_bad_prompts_are_rejected(llama):
    _, spec, params = llama
    cfg = SamplingConfig(max_new_tokens=4, temperature=0.0)
    with pytest.raises(ValueError, match=r"prompt rows \[1\] have no tokens"):
        generation.generate(
            spec, params, np.ones((2, 3), np.int32), np.array([[1, 1, 1], [0, 0, 0]]), None, cfg
        )
    with pytest.raises(ValueError, match="rng=None is only allowed for greedy"):
        generation.generate(
            spec, params, np.ones((1, 3), np.int32), None, None, SamplingConfig(max_new_tokens=4)
        )
    gpt2 = spec.replace(model_type="gpt2", position_type="learned", max_position_embeddings=16)
    with pytest.raises(ValueError, match="exceeds the model's 16 learned positions"):
        generation.generate(
            gpt2, params, np.ones((1, 3), np.int32), None, None, SamplingConfig(max_new_tokens=14)
        )
    with pytest.raises(ValueError, match="prompt_ids must be"):
        generation.generate(spec, params, np.ones((3,), np.int32), None, None, cfg)
