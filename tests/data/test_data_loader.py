"""Loader: deterministic, resumable from three integers, host-sharded; global arrays on 8 fake devices."""

import json

import jax
import numpy as np
import pytest

from jaxrlhf import data, sharding


@pytest.fixture(scope="module")
def bpe(tok_dirs):
    return data.load_tokenizer(tok_dirs["bpe"])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    rows = [
        {"prompt": f"question number {i}" + " more" * (i % 7), "completion": f" answer {i}"}
        for i in range(30)
    ]
    path = root / "pc.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return {"pc": str(path), "root": root}


def build(files, tok, kind, **kw):
    kw.setdefault("max_length", 48)
    cfg = data.DataConfig(path=files["pc"], cache_dir=str(files["root"] / "cache"), **kw)
    return data.build_dataset(cfg, tok, kind)


def take(loader, n):
    return [next(loader) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


@pytest.mark.parametrize("kind", ["sft", "prompt"])
def test_resume_yields_the_uninterrupted_batches(files, bpe, kind):
    ds = build(files, bpe, kind)
    straight = take(data.Loader(ds, 4, seed=3, process_index=0, process_count=1), 20)  # 7 steps / epoch
    first = data.Loader(ds, 4, seed=3, process_index=0, process_count=1)
    part = take(first, 9)
    state = json.loads(json.dumps(first.state()))  # what a checkpoint stores
    assert state == {"epoch": 1, "step": 2, "seed": 3}
    resumed = data.Loader(ds, 4, seed=3, process_index=0, process_count=1)
    resumed.restore(state)
    assert_batches_equal(part + take(resumed, 11), straight)


def test_epochs_are_permutations_that_differ(files, bpe):
    ds = build(files, bpe, "prompt")
    loader = data.Loader(ds, 5, seed=0, process_index=0, process_count=1)
    epochs = [np.concatenate([b["index"] for b in take(loader, 6)]) for _ in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(30))
    assert not np.array_equal(epochs[0], epochs[1])
    ordered = data.Loader(ds, 5, shuffle=False, process_index=0, process_count=1, num_epochs=1)
    assert np.concatenate([b["index"] for b in ordered]).tolist() == list(range(30))  # stops after one epoch
    with pytest.raises(ValueError, match="seed"):
        ordered.restore({"epoch": 0, "step": 0, "seed": 1})


def test_two_hosts_read_disjoint_slices_covering_the_epoch(files, bpe):
    ds = build(files, bpe, "prompt")
    one = data.Loader(ds, 6, seed=1, process_index=0, process_count=1, num_epochs=1)
    hosts = [data.Loader(ds, 6, seed=1, process_index=p, process_count=2, num_epochs=1) for p in (0, 1)]
    seen = []
    for g, h0, h1 in zip(one, *hosts, strict=True):
        assert h0["prompt_ids"].shape[0] == h1["prompt_ids"].shape[0] == 3
        assert not set(h0["index"]) & set(h1["index"])
        assert np.concatenate([h0["index"], h1["index"]]).tolist() == g["index"].tolist()
        seen += g["index"].tolist()
    assert sorted(seen) == list(range(30))
    with pytest.raises(ValueError, match="divisible"):
        data.Loader(ds, 5, process_index=0, process_count=2)


def test_streaming_resume_and_hosts(files, bpe):
    ds = build(files, bpe, "prompt", streaming=True)
    straight = take(data.Loader(ds, 4, seed=2, process_index=0, process_count=1), 10)
    first = data.Loader(ds, 4, seed=2, process_index=0, process_count=1)
    part = take(first, 4)
    resumed = data.Loader(ds, 4, seed=2, process_index=0, process_count=1)
    resumed.restore(first.state())
    assert_batches_equal(part + take(resumed, 6), straight)
    epoch = [b["index"] for b in take(data.Loader(ds, 2, seed=2, process_index=0, process_count=1), 15)]
    assert sorted(np.concatenate(epoch).tolist()) == list(range(30))
    h = [take(data.Loader(ds, 2, seed=2, process_index=p, process_count=2), 7) for p in (0, 1)]
    i0, i1 = (set(np.concatenate([b["index"] for b in x]).tolist()) for x in h)
    assert not i0 & i1 and len(i0) == len(i1) == 7


def test_prompt_batches_are_left_padded_to_a_bucket(files, bpe):
    ds = build(files, bpe, "prompt", max_prompt_length=40)
    assert ds.buckets == (16, 32, 40)
    for batch in data.Loader(ds, 3, seed=0, process_index=0, process_count=1, num_epochs=1):
        ids, mask = batch["prompt_ids"], batch["prompt_mask"]
        assert ids.shape[1] == min(
            b for b in ds.buckets if b >= mask.sum(1).max()
        )  # smallest bucket that fits
        for row, m, i in zip(ids, mask, batch["index"], strict=True):
            n = int(m.sum())
            assert m[-n:].all() and not m[:-n].any()  # left padding
            assert row[-n:].tolist() == ds.data[int(i)]["prompt_ids"]


def test_sft_batch_layout_and_packing(files, bpe):
    plain = build(files, bpe, "sft")
    batch = next(data.Loader(plain, 4, shuffle=False, process_index=0, process_count=1))
    assert set(batch) == {"input_ids", "attention_mask", "loss_mask", "positions", "segment_ids"}
    assert all(v.shape == (4, 48) and v.dtype == np.int32 for v in batch.values())
    n = batch["attention_mask"].sum(1)
    assert (batch["positions"][0, : n[0]] == np.arange(n[0])).all()
    assert (batch["loss_mask"] <= batch["attention_mask"]).all()
    packed = build(files, bpe, "sft", packing=True)
    assert len(packed) < len(plain)
    total = sum(len(x) for x in plain.data["input_ids"])
    assert sum(len(x) for x in packed.data["input_ids"]) == total  # every token is kept exactly once
    batch = next(data.Loader(packed, 2, shuffle=False, process_index=0, process_count=1))
    seg, pos, lm = batch["segment_ids"], batch["positions"], batch["loss_mask"]
    starts = (pos == 0) & (seg > 0)
    assert (lm[starts] == 0).all()  # no loss on a segment's first token (nothing predicts it)
    assert seg.max() > 1
    # the dataset knows its most examples per row: the static bound of the fused attention's layout
    assert plain.max_segments is None
    assert packed.max_segments == max(max(r) for r in packed.data["segment_ids"]) > 1
    assert set(batch) == {"input_ids", "attention_mask", "loss_mask", "positions", "segment_ids"}
    capped = build(files, bpe, "sft", packing=True, max_segments_per_row=2)
    assert capped.max_segments == 2 and len(capped) >= len(packed)


def test_eval_fraction_and_split(files, bpe, tmp_path):
    ds = build(files, bpe, "sft", eval_fraction=0.2)
    assert (len(ds), len(ds.eval)) == (24, 6)
    assert not set(ds.data["index"]) & set(ds.eval.data["index"])
    (tmp_path / "train.jsonl").write_text(json.dumps({"text": "a b c"}) + "\n" + json.dumps({"text": "d"}))
    (tmp_path / "test.jsonl").write_text(json.dumps({"text": "e f"}))
    cfg = data.DataConfig(path=str(tmp_path), eval_split="test", max_length=16, cache_dir=str(tmp_path / "c"))
    ds = data.build_dataset(cfg, bpe, "sft")
    assert (len(ds), len(ds.eval)) == (2, 1)


def test_to_global_shards_the_batch_over_data_and_fsdp(files, bpe):
    ds = build(files, bpe, "sft")
    batch = next(data.Loader(ds, 8, seed=0))  # process index/count from jax: 0 / 1
    mesh = sharding.make_mesh(data=2, fsdp=4, tensor=1)
    out = data.to_global(batch, mesh)
    for k, v in batch.items():
        assert isinstance(out[k], jax.Array) and out[k].shape == v.shape
        np.testing.assert_array_equal(np.asarray(out[k]), v)
        assert out[k].sharding.spec[0] == ("data", "fsdp")
        assert len({s.data.shape for s in out[k].addressable_shards}) == 1
        assert out[k].addressable_shards[0].data.shape == (1, v.shape[1])
