"""Shared-prompt pair rows (``jaxrlhf.pairs``, used by DPO and the reward model): the same DPO log-probs,
reward scores and gradients as the chosen and rejected rows run separately, for pairs sharing their whole
prompt, part of it, nothing, or with an empty response; ``pair_shape`` fits every pair of a dataset, and a
row that does not fit is NaN, never truncated."""

from __future__ import annotations

import datasets
import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf import data, models
from jaxrlhf.models import ModelSpec
from jaxrlhf.stages import dpo

SPEC = ModelSpec(
    model_type="llama", vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=8, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
    eos_token_ids=(2,),
)  # fmt: skip


def _batch(prompts, chosen, rejected, t=16):
    """Preference rows [prompt, response] right-padded to t (loss on the response)."""
    out = {}
    for side, resp in (("chosen", chosen), ("rejected", rejected)):
        ids, att, loss = (np.zeros((len(resp), t), np.int32) for _ in range(3))
        for i, (p, r) in enumerate(zip(prompts[side], resp, strict=True)):
            row = list(p) + list(r)
            ids[i, : len(row)], att[i, : len(row)], loss[i, len(p) : len(row)] = row, 1, 1
        out |= {f"{side}_input_ids": ids, f"{side}_attention_mask": att, f"{side}_loss_mask": loss}
    return out


def _cases():
    rng = np.random.default_rng(0)
    tok = lambda n: rng.integers(3, 97, n).tolist()  # noqa: E731
    p = [tok(5), tok(3), tok(1), tok(6), [], tok(4)]
    prompts = {"chosen": p, "rejected": [list(x) for x in p]}
    prompts["rejected"][1][2] = (prompts["rejected"][1][2] + 1) % 97 + 3  # prompts differ from token 2 on
    prompts["rejected"][5] = tok(2) + prompts["chosen"][5][2:]  # differ from token 0: nothing shared
    chosen = [tok(4), tok(6), tok(9), tok(2), tok(5), tok(3)]
    rejected = [tok(7), tok(2), tok(5), tok(4), tok(3), tok(6)]
    rejected[3] = []  # an empty response (no loss tokens)
    return _batch(prompts, chosen, rejected)


def test_packed_rows_give_the_separate_rows_logps_and_gradients():
    params = models.init_params(SPEC, jax.random.key(0))
    batch = {k: jnp.asarray(v) for k, v in _cases().items()}
    ids, loss, lay = dpo.pack_pairs(batch, dpo.PairShape(32, 16))
    np.testing.assert_array_equal(np.asarray(lay.shared), [5, 2, 1, 6, 0, 0])
    weights = jnp.arange(1.0, 13.0)
    for impl in ("plain", "fused"):  # fused on CPU: the virtual rows + custom-VJP gathers

        def f(p, shape, impl=impl):
            lp, n = dpo.pair_logps(SPEC, p, batch, shape=shape, attention_impl=impl, max_segments=1)
            return jnp.sum(lp * weights), (lp, n)

        (_, (want, n_want)), g_want = jax.jit(jax.value_and_grad(lambda p: f(p, None), has_aux=True))(params)
        (_, (got, n_got)), g_got = jax.jit(
            jax.value_and_grad(lambda p: f(p, dpo.PairShape(32, 16)), has_aux=True)
        )(params)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
        np.testing.assert_array_equal(np.asarray(n_got), np.asarray(n_want))
        assert np.asarray(want)[9] == 0.0 and np.asarray(want)[:9].min() < -1.0  # empty response: 0
        for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


def test_pair_shape_fits_the_data_and_short_rows_are_nan():
    rows = _cases()
    cols = {"margin": [0.0] * 6}
    for side in ("chosen", "rejected"):
        n = rows[f"{side}_attention_mask"].sum(axis=1)
        for k in ("input_ids", "loss_mask"):
            cols[f"{side}_{k}"] = [r[:m].tolist() for r, m in zip(rows[f"{side}_{k}"], n, strict=True)]
    ds = data.TokenizedDataset(
        data=datasets.Dataset.from_dict(cols), kind="preference", format="preference", pad_token_id=0,
        max_length=16, buckets=(16,),
    )  # fmt: skip
    # longest packed row: pair 5, nothing shared: (4 + 3) + (4 + 6) = 17; widest row: pair 0's rejected, 5 + 7
    assert dpo.pair_shape(ds, round_to=1) == dpo.PairShape(17, 12)
    assert dpo.pair_shape(ds) == dpo.PairShape(32, 16)  # rounded up to 16, capped at 2 T and T
    params = models.init_params(SPEC, jax.random.key(0))
    batch = {k: jnp.asarray(v) for k, v in _cases().items()}
    # L 16 < 17 (pair 5), V 11 < 12 (pair 0): those pairs are NaN (both sides), the others finite
    lp, _ = jax.jit(lambda p: dpo.pair_logps(SPEC, p, batch, shape=dpo.PairShape(16, 11)))(params)
    lp = np.asarray(lp)
    bad = [0, 5, 6, 11]
    assert np.isnan(lp[bad]).all() and np.isfinite(np.delete(lp, bad)).all()


def test_reward_model_scores_packed_rows_as_the_separate_rows():
    """reward_model.score_pairs on shared-prompt rows == on the concatenated rows (scores and gradients of the
    Bradley-Terry loss), incl. a rejected row with no response tokens (scored inside the shared prompt)."""
    from jaxrlhf import losses, reward_model
    from jaxrlhf.models import heads

    params = models.init_params(SPEC, jax.random.key(0))
    head = heads.init_head(SPEC, jax.random.key(1))
    batch = {k: jnp.asarray(v) for k, v in _cases().items()}
    for impl in ("plain", "fused"):

        def f(p, h, shape, impl=impl):
            rc, rr = reward_model.score_pairs(
                SPEC, p, h, batch, shape=shape, attention_impl=impl, max_segments=1
            )
            return losses.reward_loss(rc, rr)[0], (rc, rr)

        grad = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)
        (_, want), g_want = jax.jit(lambda p, h, grad=grad: grad(p, h, None))(params, head)
        (_, got), g_got = jax.jit(lambda p, h, grad=grad: grad(p, h, dpo.PairShape(32, 16)))(params, head)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
        for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)
