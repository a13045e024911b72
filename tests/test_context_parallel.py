"""Context parallelism: how a packed micro-batch is padded and split over ranks, how the loss is
aggregated over the shares, and the model on the shares against the same weights on the whole
batch (torchrun, TP=2 x CP=2 with sequence parallelism). The trainers' runs at CP=2 are in
test_sft.py and test_rl.py."""

import json

import pytest
import torch

from conftest import run_torchrun
from megatron_vr1.data import build_sample, load_tokenizer, packed_batch, process_images
from megatron_vr1.kernels import IGNORE_INDEX, aggregate_loss
from megatron_vr1.models.common.context_parallel import shard_rows


def test_each_rank_takes_two_mirrored_chunks_of_every_sequence():
    bounds = [0, 8, 12]  # sequences of 8 and 4 rows over 2 ranks: chunks of 2 and 1
    assert shard_rows(bounds, 2, 0) == [0, 1, 6, 7, 8, 11]
    assert shard_rows(bounds, 2, 1) == [2, 3, 4, 5, 9, 10]
    rows = [r for rank in range(4) for r in shard_rows([0, 16, 24], 4, rank)]
    assert sorted(rows) == list(range(24))  # every row exactly once
    with pytest.raises(ValueError, match="multiple of 4 rows.*the one at row 8 has 6"):
        shard_rows([0, 8, 14], 2, 0)


@pytest.fixture(scope="module")
def samples(tokenizer_dir, args):
    import numpy as np
    from PIL import Image

    tok = load_tokenizer(tokenizer_dir)
    pixels = np.random.default_rng(0).integers(0, 255, (112, 112, 3), dtype=np.uint8)
    out = []
    for question, images in (("Add 2 and 3.", []), ("<image>What is drawn?", [Image.fromarray(pixels)])):
        out.append(build_sample(tok, args, [{"role": "user", "content": question},
                                            {"role": "assistant", "content": "<answer> 5 </answer>"}],
                                *process_images(images)))
    return out


def test_packed_sequences_are_padded_for_the_split_and_the_padding_is_never_learned(samples, args):
    plain = packed_batch(samples, args)
    batch = packed_batch(samples, args, pad_to_multiple_of=8, sequence_multiple=4, pad_id=7)
    assert batch.lengths == plain.lengths and all(b % 4 == 0 and b - n < 4 for b, n in zip(batch.blocks, batch.lengths))
    assert batch.input_ids.shape[1] % 8 == 0 and batch.cu_seqlens.tolist()[1:] == torch.tensor(batch.blocks).cumsum(0).tolist()
    # the same labels, loss mask and positions on each sequence's own rows; padding is pad_id and no label
    first = batch.blocks[0]
    for name in ("input_ids", "labels", "loss_mask"):
        got, want = getattr(batch, name), getattr(plain, name)
        assert torch.equal(got[:, :len(samples[0])], want[:, :len(samples[0])]), name
        assert torch.equal(got[:, first:first + len(samples[1])], want[:, len(samples[0]):plain.num_tokens]), name
    assert torch.equal(batch.position_ids[:, :, first:first + len(samples[1])],
                       plain.position_ids[:, :, len(samples[0]):plain.num_tokens])
    assert (batch.input_ids[0, len(samples[0]):first] == 7).all()
    assert (batch.labels[0, len(samples[0]) - 1:first] == IGNORE_INDEX).all()
    assert batch.loss_mask.sum() == plain.loss_mask.sum()
    spread = batch.per_token(torch.tensor([2.0, 3.0]))
    assert spread[0, :len(samples[0])].eq(2).all() and spread[0, len(samples[0]):first].eq(0).all()
    assert spread.sum() == 2 * len(samples[0]) + 3 * len(samples[1])
    with pytest.raises(ValueError, match="pad_to_multiple_of \\(6\\) must be a multiple of sequence_multiple"):
        packed_batch(samples, args, pad_to_multiple_of=6, sequence_multiple=4)


def test_shares_hold_every_row_once_and_the_image_features_they_need(samples, args):
    whole = packed_batch(samples, args, pad_to_multiple_of=4, sequence_multiple=4)
    whole.extras["advantages"] = whole.per_token(torch.tensor([0.5, -1.0]))
    shares = [whole.context_shard(2, rank) for rank in range(2)]
    assert [s.input_ids.shape[1] for s in shares] == [whole.input_ids.shape[1] // 2] * 2
    assert sum(s.loss_mask.sum() for s in shares) == whole.loss_mask.sum()
    assert sum(s.extras["advantages"].sum() for s in shares) == whole.extras["advantages"].sum()
    assert [sum(s.lengths[i] for s in shares) for i in range(2)] == whole.lengths
    features = sorted(f for s in shares for f in s.image_feature_index.tolist())
    assert features == list(range(whole.image_positions.numel()))  # each image token in one share
    for s in shares:
        assert s.packed_seq_params().host_cu_seqlens == tuple(whole.sequence_bounds())  # attention sees the whole
        assert (s.input_ids[0, s.image_positions] == args.image_token_id).all()
        assert torch.equal(s.context.sequence_loss_tokens, torch.tensor(
            [float(whole.loss_mask[0, a:b].sum()) for a, b in zip(whole.sequence_bounds()[:-1], whole.sequence_bounds()[1:])][:2]))
    assert whole.context_shard(1, 0) is whole
    with pytest.raises(ValueError, match="before context_shard"):
        shares[0].per_token(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="multiple of 4 rows"):
        packed_batch(samples, args).context_shard(2, 0)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "dr-grpo"])
def test_loss_shares_add_up_to_the_whole_batch(mode):
    """aggregate_loss on each rank's share (with the whole sequences' token counts, and the
    sequences counted by one rank) sums to the textbook aggregation of the whole batch."""
    torch.manual_seed(0)
    bounds = [0, 8, 16, 20]
    loss, mask = torch.randn(1, 20), torch.rand(1, 20) > 0.3
    mask[0, 16:] = False  # a sequence with no loss token
    seq_loss = [float((loss[0, a:b] * mask[0, a:b]).sum()) for a, b in zip(bounds[:-1], bounds[1:])]
    seq_tokens = [int(mask[0, a:b].sum()) for a, b in zip(bounds[:-1], bounds[1:])]
    textbook = {"token-mean": (sum(seq_loss), sum(seq_tokens)),
                "seq-mean-token-mean": (sum(s / n for s, n in zip(seq_loss, seq_tokens) if n),
                                        sum(1 for n in seq_tokens if n)),
                "dr-grpo": (sum(seq_loss), 3 * 10)}[mode]
    total = count = 0.0
    for rank in range(2):
        rows = torch.tensor(shard_rows(bounds, 2, rank))
        part = aggregate_loss(loss[:, rows], mask[:, rows], mode=mode, cu_seqlens=torch.tensor([0, 4, 8, 10]),
                              max_response_length=10, sequence_tokens=torch.tensor(seq_tokens, dtype=torch.float),
                              count_sequences=rank == 0)
        total, count = total + float(part.total), count + float(part.count)
    whole = aggregate_loss(loss, mask, mode=mode, cu_seqlens=torch.tensor(bounds), max_response_length=10)
    assert (float(whole.total), float(whole.count)) == pytest.approx(textbook, rel=1e-6)
    assert (total, count) == pytest.approx(textbook, rel=1e-6)


def test_the_model_on_context_parallel_shares_matches_the_whole_batch(tmp_path, tokenizer_dir):
    """TP=2 x CP=2 with sequence parallelism: per-token cross-entropy, vocab-parallel log-probs,
    the GRPO loss, the three aggregations and the gradients (ViT included; summed over the
    context-parallel ranks as the DDP does) equal those of the whole micro-batch through the
    same weights without context parallelism, and each share holds some of the image tokens."""
    run_torchrun("dist/context_parallel_worker.py", 4, "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path),
                 "--tp", "2", "--cp", "2", "--sequence-parallel")
    results = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank*.json"))]
    assert len(results) == 4
    for tp_rank in (0, 1):
        shares = [r for r in results if r["tp_rank"] == tp_rank]
        assert sorted(r["cp_rank"] for r in shares) == [0, 1]
        whole = shares[0]["whole"]
        assert whole["tokens"] > 0 and whole["ce"] > 0
        for key, value in whole.items():
            assert sum(r["share"][key] for r in shares) == pytest.approx(value, rel=1e-5, abs=1e-5), key
        for r in shares:
            assert r["grad_rel_diff"] <= 1e-5
            assert r["rows"][1] * 2 == r["rows"][0]
            assert 0 < r["image_tokens"][1] < r["image_tokens"][0]
