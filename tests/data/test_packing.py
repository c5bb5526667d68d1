"""Packing: every example kept once with reset positions, and a packed row gives, through the model, exactly
the logits of its examples run one by one."""

import json

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

from jaxrlhf import data, models
from jaxrlhf.data.packing import bucket_for, length_buckets, pack_examples


@given(
    lengths=st.lists(st.integers(1, 16), min_size=1, max_size=30),
    max_length=st.integers(16, 40),
    max_segments=st.sampled_from([None, 1, 2, 3]),
)
def test_pack_examples_keeps_every_example_once(lengths, max_length, max_segments):
    ids = [[100 * i + t for t in range(n)] for i, n in enumerate(lengths)]
    masks = [[0] + [1] * (n - 1) for n in lengths]
    rows = pack_examples(ids, masks, max_length, max_segments)
    assert rows["num_segments"] == [max(r) for r in rows["segment_ids"]]
    if max_segments is not None:  # the bound forward(max_segments=) is given
        assert max(rows["num_segments"]) <= max_segments
    found = []
    for r_ids, r_mask, r_seg, r_pos in zip(
        *(rows[k] for k in ("input_ids", "loss_mask", "segment_ids", "positions")), strict=True
    ):
        assert len(r_ids) == len(r_mask) == len(r_seg) == len(r_pos) <= max_length
        segs = sorted(set(r_seg))
        assert segs == list(range(1, len(segs) + 1))
        for s in segs:
            idx = [k for k, v in enumerate(r_seg) if v == s]
            assert idx == list(range(idx[0], idx[-1] + 1))  # contiguous
            assert [r_pos[k] for k in idx] == list(range(len(idx)))  # positions restart
            example = [r_ids[k] for k in idx]
            found.append(example)
            assert [r_mask[k] for k in idx] == masks[example[0] // 100]
    assert sorted(found) == sorted(ids)
    assert len(rows["input_ids"]) >= -(-sum(lengths) // max_length)
    assert pack_examples(ids, masks, max_length, max_segments) == rows  # deterministic


def test_length_buckets():
    assert length_buckets(100) == (16, 32, 64, 100)
    assert length_buckets(64) == (16, 32, 64)
    assert bucket_for(17, (16, 32)) == 32
    with pytest.raises(ValueError):
        bucket_for(33, (16, 32))


@pytest.fixture(scope="module")
def packed_and_plain(tok_dirs, tmp_path_factory):
    tok = data.load_tokenizer(tok_dirs["bpe"], chat_template="chatml")
    root = tmp_path_factory.mktemp("pack")
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"q{i} " * (1 + i % 3)},
                {"role": "assistant", "content": f"a{i}"},
            ]
        }
        for i in range(8)
    ]
    (root / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = dict(path=str(root / "m.jsonl"), max_length=64, cache_dir=str(root / "c"))
    plain = data.build_dataset(data.DataConfig(**cfg), tok, "sft")
    packed = data.build_dataset(data.DataConfig(**cfg, packing=True), tok, "sft")
    return tok, plain, packed


def test_packed_logits_equal_separate_logits(packed_and_plain):
    tok, plain, packed = packed_and_plain
    spec = models.ModelSpec(
        model_type="llama",
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    params = models.init_params(spec, jax.random.key(0))
    fwd = jax.jit(
        lambda ids, mask, pos, seg: models.forward(spec, params, ids, mask, positions=pos, segment_ids=seg)
    )
    alone = jax.jit(lambda ids, mask: models.forward(spec, params, ids, mask).logits)

    batch = data.collate([packed.data[0], packed.data[1]], packed)
    assert batch["segment_ids"].max() >= 3  # several examples in a row
    logits = np.asarray(
        fwd(
            *(jnp.asarray(batch[k]) for k in ("input_ids", "attention_mask", "positions", "segment_ids"))
        ).logits
    )
    by_ids = {tuple(x): x for x in plain.data["input_ids"]}
    checked = 0
    for b in range(2):
        seg = batch["segment_ids"][b]
        for s in range(1, seg.max() + 1):
            where = np.flatnonzero(seg == s)
            example = batch["input_ids"][b, where].tolist()
            assert tuple(example) in by_ids  # the segment is one whole example
            single = data.collate([{"input_ids": example, "loss_mask": [0] * len(example)}], plain)
            ref = np.asarray(alone(jnp.asarray(single["input_ids"]), jnp.asarray(single["attention_mask"])))
            np.testing.assert_allclose(logits[b, where], ref[0, : len(where)], atol=1e-5, rtol=1e-5)
            checked += 1
    assert checked >= 4
    # without segment ids the later examples would attend to the earlier ones: the logits differ
    leaky = np.asarray(
        fwd(
            jnp.asarray(batch["input_ids"]),
            jnp.asarray(batch["attention_mask"]),
            jnp.asarray(batch["positions"]),
            jnp.asarray(batch["attention_mask"]),
        ).logits
    )
    second = np.flatnonzero(batch["segment_ids"][0] == 2)
    assert np.abs(leaky[0, second] - logits[0, second]).max() > 1e-3
