"""The decode loop over an abstract step function (a bigram 'model'), against a plain Python loop."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf import generation
from jaxrlhf._sampling import SamplingConfig

V, B, N = 12, 5, 10
TABLE = np.random.RandomState(0).randn(V, V).astype(np.float32) * 2


def step_fn(cache, tokens, positions):
    """A bigram model whose logits also drift with the position; the cache counts calls."""
    logits = jnp.asarray(TABLE)[tokens] + 0.3 * jnp.sin(positions.astype(jnp.float32))[:, None]
    return logits, {"calls": cache["calls"] + 1}


def initial_state(first_tokens, buf=16, seed=0, pad=0):
    b = len(first_tokens)
    return generation.DecodeState(
        step=jnp.zeros((), jnp.int32),
        cache={"calls": jnp.zeros((), jnp.int32)},
        next_token=jnp.asarray(first_tokens, jnp.int32),
        next_pos=jnp.arange(b, dtype=jnp.int32) + 3,
        tokens=jnp.full((b, buf), pad, jnp.int32),
        logprobs=jnp.zeros((b, buf)),
        raw_logprobs=jnp.zeros((b, buf)),
        done=jnp.zeros((b,), bool),
        lengths=jnp.zeros((b,), jnp.int32),
        rng=jax.random.key(seed),
    )


def reference_greedy(first, pos, n, stop, min_new, pad):
    toks, tok, p = [], first, pos
    for step in range(n):
        z = TABLE[tok] + 0.3 * np.sin(np.float32(p))
        if step < min_new:
            z = np.where(np.isin(np.arange(V), stop), -np.inf, z)
        tok = int(np.argmax(z))
        toks.append(tok)
        p += 1
        if tok in stop:
            break
    return toks + [pad] * (n - len(toks))


@pytest.mark.parametrize("min_new", [0, 3])
def test_greedy_loop_matches_python_loop_with_stops_and_padding(min_new):
    first = [0, 1, 2, 3, 4]
    # stop tokens chosen so that some rows stop early and others do not
    chains = [reference_greedy(f, 3 + i, N, (), 0, -1) for i, f in enumerate(first)]
    stop = (chains[0][2], chains[3][4])
    cfg = SamplingConfig(
        max_new_tokens=16, temperature=0.0, stop_token_ids=stop, pad_token_id=11, min_new_tokens=min_new
    )
    run = jax.jit(lambda s, n: generation.decode_loop(step_fn, s, cfg, n, n))
    out = run(initial_state(first, pad=11), jnp.int32(N))
    for i, f in enumerate(first):
        ref = reference_greedy(f, 3 + i, N, stop, min_new, 11)
        np.testing.assert_array_equal(np.asarray(out.tokens[i, :N]), ref, err_msg=f"row {i}")
        n_valid = next((k + 1 for k, t in enumerate(ref) if t in stop), N)
        assert int(out.lengths[i]) == n_valid
        assert (np.asarray(out.tokens[i, n_valid:]) == 11).all()
        assert (np.asarray(out.logprobs[i, n_valid:]) == 0).all()
    assert int(out.step) <= N


def test_loop_stops_early_when_every_row_is_done():
    chain = reference_greedy(0, 3, N, (), 0, -1)
    cfg = SamplingConfig(max_new_tokens=16, temperature=0.0, stop_token_ids=(chain[1],))
    out = jax.jit(lambda s: generation.decode_loop(step_fn, s, cfg, jnp.int32(N), jnp.int32(N)))(
        initial_state([0])
    )
    assert int(out.step) == 2 and int(out.cache["calls"]) == 2 and int(out.lengths[0]) == 2


def test_chunked_decoding_draws_what_one_call_draws():
    cfg = SamplingConfig(max_new_tokens=16, temperature=1.0, top_k=5, stop_token_ids=(7,))
    run = jax.jit(lambda s, until: generation.decode_loop(step_fn, s, cfg, jnp.int32(N), until))
    full = run(initial_state(range(B), seed=3), jnp.int32(N))
    part = initial_state(range(B), seed=3)
    for until in (3, 4, 9, N):
        part = run(part, jnp.int32(until))
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(part), strict=True):
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            continue
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the log-probs are those of the top-k distribution (sampling) and of the full softmax (raw)
    tokens, lengths = np.asarray(full.tokens), np.asarray(full.lengths)
    for i in range(B):
        prev = i
        for t in range(lengths[i]):
            z = TABLE[prev].astype(np.float64) + 0.3 * np.sin(np.float32(3 + i + t))
            tok = tokens[i, t]
            kth = np.sort(z)[-5]
            assert z[tok] >= kth
            top = z[z >= kth]
            np.testing.assert_allclose(full.logprobs[i, t], z[tok] - np.log(np.exp(top).sum()), atol=1e-5)
            np.testing.assert_allclose(full.raw_logprobs[i, t], z[tok] - np.log(np.exp(z).sum()), atol=1e-5)
            prev = tok
        assert lengths[i] == N or tokens[i, lengths[i] - 1] == 7


def test_bucket_length():
    assert [generation.bucket_length(n) for n in (1, 8, 9, 100, 1024, 1025, 1600)] == [
        8,
        8,
        16,
        128,
        1024,
        1536,
        2048,
    ]


def test_resolve_fills_model_defaults():
    from jaxrlhf.models.spec import ModelSpec

    spec = ModelSpec("llama", 32, 16, 1, 2, 2, 8, 32, eos_token_ids=(2, 5), pad_token_id=None)
    cfg = generation._resolve(spec, SamplingConfig(max_new_tokens=20))
    assert cfg.stop_token_ids == (2, 5) and cfg.pad_token_id == 0 and cfg.max_new_tokens == 32
    cfg = generation._resolve(spec, SamplingConfig(max_new_tokens=20, stop_token_ids=(), pad_token_id=3))
    assert cfg.stop_token_ids == () and cfg.pad_token_id == 3
    assert dataclasses.replace(cfg) == cfg
