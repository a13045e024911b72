"""One batch type from the data layer through the model and the loss kernels."""

import json

import pytest
import torch

from conftest import run_torchrun
from megatron_vr1.config import load_model_conf, model_from_conf
from megatron_vr1.data import build_sample, load_tokenizer, packed_batch, process_images


def test_data_to_model_to_kernels_at_tp2_with_sequence_parallelism(tmp_path, tokenizer_dir):
    """Text-only, one-image and two-image samples, packed (one or two micro-batches, padded to
    a multiple of TP), padded on either side, and one by one: every layout gives the same losses
    (model cross-entropy, vocab-parallel log-probs and GRPO loss, aggregation sums) and the same
    gradients."""
    run_torchrun("dist/batch_worker.py", 2, "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path),
                 "--sequence-parallel")
    for path in sorted(tmp_path.glob("rank*.json")):
        r = json.loads(path.read_text())
        assert r["images"] == [0, 1, 0, 2] and r["needed_padding"]
        alone = r["one_by_one"]
        assert alone["ce"] > 0 and alone["ce"] == pytest.approx(-alone["logp"], rel=1e-5)
        assert alone["logp"] == pytest.approx(alone["live_logp"], rel=1e-6)
        for name in ("packed", "two_micro_batches", "padded_right", "padded_left", "with_a_dummy"):
            got = r[name]
            assert got["tokens"] == alone["tokens"], name
            for key, value in alone.items():
                assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-5), (name, key)
            assert r["grad_rel_diff"][name] <= 1e-5, (name, r["grad_rel_diff"])
    assert len(list(tmp_path.glob("rank*.json"))) == 2


@pytest.fixture(scope="module")
def tiny_model(model_parallel_1):
    from megatron_vr1.models.qwen2_5_vl import build_model

    args, layout = model_from_conf(load_model_conf("tiny"))
    return args, build_model(args, layout, backend="local").eval()


def test_text_only_batches_run_and_skip_the_vit(tiny_model, tokenizer_dir, monkeypatch):
    args, model = tiny_model
    tok = load_tokenizer(tokenizer_dir)
    samples = [build_sample(tok, args, [{"role": "user", "content": q}, {"role": "assistant", "content": "ok"}],
                            *process_images([])) for q in ("Hi?", "What is 2 + 2?")]
    batch = packed_batch(samples, args)
    assert batch.pixel_values is None and batch.image_grid_thw is None
    monkeypatch.setattr(model.vision, "forward", lambda *a, **k: pytest.fail("the ViT ran on a text-only batch"))
    with torch.no_grad():
        loss = model(**batch.model_inputs(with_labels=True))
        alone = [model(**packed_batch([s], args).model_inputs(with_labels=True)) for s in samples]
    assert loss.shape == batch.labels.shape and torch.isfinite(loss).all()
    assert (loss[~batch.loss_mask] == 0).all()
    torch.testing.assert_close(loss.sum(), sum(x.sum() for x in alone))


def test_forward_reads_nothing_back_from_the_device(tiny_model, tokenizer_dir):
    """A packed micro-batch with images and padding through the model and its backward, with every
    tensor-to-host read recorded: ``.item()``, ``.tolist()``, truth tests, ``torch.equal``,
    ``nonzero``, boolean indexing. On a GPU each is a synchronisation (megatron-core's THD
    rotary made one per sequence per layer, the vision windows included); there must be none."""
    from PIL import Image
    from torch.overrides import TorchFunctionMode

    args, model = tiny_model
    tok = load_tokenizer(tokenizer_dir)
    samples = [build_sample(tok, args, [{"role": "user", "content": f"<image>Colour {i}?"},
                                        {"role": "assistant", "content": "red " * (3 + i)}],
                            *process_images([Image.new("RGB", (112 + 28 * i, 84), (200, 30, 30))]))
               for i in range(3)]
    batch = packed_batch(samples, args, pad_to_multiple_of=16)
    reads = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "equal", "nonzero",
             "masked_select", "unique", "cpu", "numpy")
    seen = []

    class RecordHostReads(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", "")
            boolean_index = name == "__getitem__" and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool
                for i in (args[1] if isinstance(args[1], tuple) else (args[1],)))
            if name in reads or boolean_index:
                seen.append(name)
            return func(*args, **(kwargs or {}))

    inputs = batch.model_inputs(with_labels=True)
    with RecordHostReads():
        loss = model(**inputs)
        total = loss.sum()
    total.backward()
    assert seen == [], f"host reads in the forward: {sorted(set(seen))}"
    model.zero_grad(set_to_none=True)
