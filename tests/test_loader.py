"""Map-style datasets read in a seeded, sharded, resumable order (megatron_vr1.data.loader)."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from megatron_vr1.data import SFTDataset, ShardedLoader, Skipped

N = 23  # not a multiple of any DP size used here: the last round has holes


def _record(i, image=None):
    user = ("<image>" if image else "") + f"Question number {i}?"
    rec = {"id": i, "messages": [{"role": "user", "content": user},
                                 {"role": "assistant", "content": f"Answer {i}."}]}
    if image:
        rec["images"] = [image]
    return rec


@pytest.fixture(scope="module")
def text_data(tmp_path_factory, tokenizer, args):
    path = tmp_path_factory.mktemp("text") / "sft.jsonl"
    path.write_text("\n".join(json.dumps(_record(i)) for i in range(N)))
    return SFTDataset(path, tokenizer, args)


def _id(sample, tokenizer):
    """The record number a sample came from (its question says it)."""
    text = tokenizer.decode(sample.input_ids)
    return int(text.split("Question number ")[1].split("?")[0])


def _read(data, tokenizer, rounds, **kw):
    loader = ShardedLoader(data, **kw)
    return [None if x is None else _id(x, tokenizer) for x in (loader.next() for _ in range(rounds))], loader


def test_ranks_hold_disjoint_shards_that_cover_every_epoch(text_data, tokenizer):
    for dp in (1, 2, 3, 4):
        rounds = -(-N // dp)
        per_rank = [_read(text_data, tokenizer, 2 * rounds, seed=5, dp_rank=r, dp_size=dp)[0] for r in range(dp)]
        for epoch in range(2):
            seen = [x for items in per_rank for x in items[epoch * rounds:(epoch + 1) * rounds] if x is not None]
            assert sorted(seen) == list(range(N)), (dp, epoch)  # each record exactly once per epoch
        holes = sum(x is None for items in per_rank for x in items[:rounds])
        assert holes == rounds * dp - N
    # the order is the seed's: same seed, same order; another seed or epoch, another order
    one = _read(text_data, tokenizer, 2 * N, seed=5)[0]
    assert one == _read(text_data, tokenizer, 2 * N, seed=5)[0]
    assert one[:N] != one[N:] and one[:N] != _read(text_data, tokenizer, N, seed=6)[0]
    assert _read(text_data, tokenizer, N, seed=5, shuffle=False)[0] == list(range(N))


@pytest.mark.parametrize("dp", [1, 3])
def test_resume_from_any_position_continues_the_same_order(text_data, tokenizer, dp):
    rounds = 2 * -(-N // dp) + 3  # into a third epoch
    for rank in range(dp):
        full, _ = _read(text_data, tokenizer, rounds, seed=11, dp_rank=rank, dp_size=dp)
        for k in range(rounds):
            first, loader = _read(text_data, tokenizer, k, seed=11, dp_rank=rank, dp_size=dp)
            state = json.loads(json.dumps(loader.state_dict()))  # as a checkpoint would store it
            resumed = ShardedLoader(text_data, seed=0, dp_rank=rank, dp_size=dp)
            resumed.load_state_dict(state)
            rest = [None if x is None else _id(x, tokenizer) for x in (resumed.next() for _ in range(rounds - k))]
            assert first + rest == full, (rank, k)


def test_resume_with_another_data_parallel_size(text_data, tokenizer):
    """The position counts records, not rounds: after 4 rounds at DP=2, DP=3 reads the rest."""
    order, _ = _read(text_data, tokenizer, N, seed=3)
    consumed = []
    for rank in range(2):
        items, loader = _read(text_data, tokenizer, 4, seed=3, dp_rank=rank, dp_size=2)
        consumed += items
    state = loader.state_dict()
    assert state["offset"] == 8 and sorted(consumed) == sorted(order[:8])
    rest = []
    for rank in range(3):
        resumed = ShardedLoader(text_data, seed=0, dp_rank=rank, dp_size=3)
        resumed.load_state_dict(state)
        rest += [x for x in resumed.take(-(-(N - 8) // 3)) if x is not None]
    assert sorted(_id(x, tokenizer) for x in rest) == sorted(order[8:])


def test_a_rank_builds_only_its_own_records(text_data, tokenizer, monkeypatch):
    built = []
    real = type(text_data).__getitem__
    monkeypatch.setattr(type(text_data), "__getitem__", lambda self, i: built.append(i) or real(self, i))
    items, _ = _read(text_data, tokenizer, 5, seed=1, dp_rank=2, dp_size=4)
    assert sorted(built) == sorted(items) and len(built) == 5


def _write_images(root, n):
    (root / "img").mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40 + 4 * i, 60, 3), dtype=np.uint8)).save(root / "img" / f"{i}.png")


def test_images_are_decoded_in_worker_processes_in_order(tmp_path, tokenizer, args, monkeypatch):
    from megatron_vr1.data import formats

    _write_images(tmp_path, 9)
    (tmp_path / "sft.jsonl").write_text("\n".join(json.dumps(_record(i, f"img/{i}.png")) for i in range(9)))
    data = SFTDataset(tmp_path / "sft.jsonl", tokenizer, args)
    pids = tmp_path / "pids.txt"
    real = formats.load_image

    def recording(*a, **k):
        with open(pids, "a") as f:
            f.write(f"{os.getpid()}\n")
        return real(*a, **k)

    monkeypatch.setattr(formats, "load_image", recording)
    inline = ShardedLoader(data, seed=2, dp_rank=1, dp_size=2).take(8)
    main_only = set(pids.read_text().split())
    pids.unlink()
    workers = ShardedLoader(data, seed=2, dp_rank=1, dp_size=2, num_workers=2)
    pooled = workers.take(8)
    workers.close()
    assert [_id(s, tokenizer) for s in pooled] == [_id(s, tokenizer) for s in inline]
    assert all((a.pixel_values == b.pixel_values).all() for a, b in zip(pooled, inline))
    decoded_in = set(pids.read_text().split())
    assert main_only == {str(os.getpid())} and str(os.getpid()) not in decoded_in and len(decoded_in) == 2


def test_bad_records_are_counted_or_named(tmp_path, tokenizer, args):
    records = [_record(i) for i in range(6)]
    records[4] = {"messages": [{"role": "user", "content": "no reply"}]}
    (tmp_path / "sft.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    data = SFTDataset(tmp_path / "sft.jsonl", tokenizer, args, skip_bad_samples=True)
    assert isinstance(data[4], Skipped) and "sft.jsonl:5" in data[4].record
    loader = ShardedLoader(data, seed=0, shuffle=False)
    assert [_id(s, tokenizer) for s in loader.take(6)] == [0, 1, 2, 3, 5]
    assert loader.report.total == 1
    strict = ShardedLoader(SFTDataset(tmp_path / "sft.jsonl", tokenizer, args), seed=0, shuffle=False)
    with pytest.raises(ValueError, match=r"sft.jsonl:5.*no assistant reply"):
        strict.take(6)
    with pytest.raises(ValueError, match="saved for 23 records"):
        loader.load_state_dict({"epoch": 0, "offset": 0, "seed": 0, "shuffle": True, "num_records": 23})
    with pytest.raises(IndexError, match="out of range"):
        data[6]


def test_length_is_the_built_sample_length_without_decoding(tmp_path, tokenizer, args, monkeypatch):
    from megatron_vr1.data import formats

    _write_images(tmp_path, 5)
    records = [_record(i, f"img/{i}.png") for i in range(5)] + [_record(i) for i in range(5, 8)]
    (tmp_path / "sft.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    data = SFTDataset(tmp_path / "sft.jsonl", tokenizer, args)
    decoded = []
    real = formats.load_image
    monkeypatch.setattr(formats, "load_image", lambda *a, **k: decoded.append(a[0]) or real(*a, **k))
    lengths = [data.length(i) for i in range(len(data))]
    assert not decoded  # image headers only
    assert lengths == [len(data[i]) for i in range(len(data))]


def _step_ids(step, tokenizer):
    return [_id(s, tokenizer) for mb in step.micro_batches for s in mb]


def test_global_batches_are_the_same_records_at_any_dp_size_balanced_over_ranks(tmp_path, tokenizer, args):
    from megatron_vr1.data import GlobalBatchLoader

    _write_images(tmp_path, 6)
    records = [_record(i, f"img/{i % 6}.png") if i % 3 else _record(i) for i in range(N)]
    (tmp_path / "sft.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    data = SFTDataset(tmp_path / "sft.jsonl", tokenizer, args)
    longest = max(data.length(i) for i in range(N))
    kw = dict(seed=4, global_batch=6, micro_batch_tokens=2 * longest)
    steps = 9  # past two epochs of 23 records
    single = GlobalBatchLoader(data, **kw)
    alone = [sorted(_step_ids(single.next_step(), tokenizer)) for _ in range(steps)]
    assert all(len(ids) == 6 for ids in alone)
    assert len({x for ids in alone[:3] for x in ids}) == 18  # within an epoch no record comes twice
    for dp in (2, 3):
        loaders = [GlobalBatchLoader(data, dp_rank=r, dp_size=dp, **kw) for r in range(dp)]
        for k in range(steps):
            parts = [loader.next_step() for loader in loaders]
            assert len({len(p.micro_batches) for p in parts}) == 1  # the same schedule on every rank
            assert all(sum(len(s) for s in mb) <= kw["micro_batch_tokens"] for p in parts for mb in p.micro_batches)
            assert sorted(x for p in parts for x in _step_ids(p, tokenizer)) == alone[k], (dp, k)
        state = loaders[0].state_dict()
        resumed = GlobalBatchLoader(data, dp_rank=0, dp_size=dp, **kw)
        resumed.load_state_dict(state)
        assert _step_ids(resumed.next_step(), tokenizer) == _step_ids(loaders[0].next_step(), tokenizer)


def _bad_data(root):
    """Ten records, three of them bad in the ways a real run met them at steps 8, 11 and 12: a
    malformed record, a missing image, a damaged image (a PNG whose pixel data fails its checksum)."""
    _write_images(root, 10)
    damaged = bytearray((root / "img" / "7.png").read_bytes())
    damaged[-40] ^= 0xFF  # inside the last data chunk: the header still reads
    (root / "img" / "7.png").write_bytes(bytes(damaged))
    records = [_record(i, f"img/{i}.png") for i in range(10)]
    records[2] = {"id": 2, "messages": [{"role": "user", "content": 5}]}
    records[5]["images"] = ["img/missing.png"]
    (root / "sft.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    return root / "sft.jsonl"


@pytest.mark.parametrize("workers", [0, 2])
def test_the_preflight_finds_every_bad_record_before_anything_trains(tmp_path, tokenizer, args, workers, monkeypatch):
    from megatron_vr1.data import preflight as module
    from megatron_vr1.data.preflight import find_bad_records, preflight
    from megatron_vr1.errors import UsageError

    monkeypatch.setattr(module, "POOL_MIN", 1)  # ten records through the worker pool too
    path = _bad_data(tmp_path)
    data = SFTDataset(path, tokenizer, args)
    bad = find_bad_records(data, workers=workers)
    assert [i for i, _ in bad] == [2, 5, 7], bad
    assert "content must be text" in bad[0][1] and "img/missing.png does not exist" in bad[1][1]
    assert "data.image_root" in bad[1][1] and "7.png cannot be decoded" in bad[2][1]
    with pytest.raises(UsageError, match=r"^3 bad records of 10: sft.jsonl:3 \(id 2\).*set data.skip_bad_samples"):
        preflight(data, skip_bad=False, workers=workers)
    said = []
    assert preflight(SFTDataset(path, tokenizer, args, skip_bad_samples=True), skip_bad=True, workers=workers,
                     say=said.append) == 3
    assert said[0].startswith("data check: 3 records of 10 will be skipped and counted")


def test_a_worker_s_error_is_its_own_one_line(tmp_path, tokenizer, args):
    """An error inside a DataLoader worker reaches the trainer as the error itself, not a worker
    traceback."""
    (tmp_path / "sft.jsonl").write_text("\n".join(json.dumps(r) for r in [
        _record(0), {"id": 1, "messages": [{"role": "user", "content": "no reply"}]}]))
    loader = ShardedLoader(SFTDataset(tmp_path / "sft.jsonl", tokenizer, args), seed=0, shuffle=False, num_workers=1)
    with pytest.raises(ValueError) as caught:
        loader.take(2)
    loader.close()
    assert str(caught.value) == "sft.jsonl:2 (id 1): conversation has no assistant reply to train on"
