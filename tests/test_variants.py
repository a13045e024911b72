"""The GRPO variants beside Vision-R1's default: GSPO's sequence-level ratio, DAPO's overlong
reward shaping and truncation mask, DAPO's dynamic sampling; each against a float64 textbook
written from its paper's formula."""

from __future__ import annotations

import pytest
import torch

import megatron_vr1.kernels as kernels
import textbook
from megatron_vr1.kernels import aggregate_loss, shift_labels

BACKENDS = ["triton", "torch"]
KW = dict(temperature=0.9, clip_low=0.05, clip_high=0.08, kl_beta=0.04)


def _packed_case(seed=0, v=900):
    g = torch.Generator().manual_seed(seed)
    lengths = [6, 9, 4, 7]
    cu = torch.nn.functional.pad(torch.tensor(lengths).cumsum(0), (1, 0))
    ids = torch.randint(0, v, (sum(lengths),), generator=g)
    labels = shift_labels(ids, cu)
    mask = labels != -100
    mask[[0, 6, 7]] = False  # prompt tokens
    logits = torch.randn(sum(lengths), v, generator=g) * 2
    z = logits.double() / KW["temperature"]
    logp = (z - torch.logsumexp(z, -1, keepdim=True)).gather(1, labels.clamp(min=0)[:, None])[:, 0].float()
    old = logp + 0.15 * torch.randn(sum(lengths), generator=g)
    ref = logp + 0.3 * torch.randn(sum(lengths), generator=g)
    adv = torch.tensor([0.9, -1.1, 0.4, -0.3]).repeat_interleave(torch.tensor(lengths))
    sequences = [list(range(s, e)) for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())]
    return logits, labels, old, ref, adv, mask, cu, sequences


@pytest.mark.parametrize("backend", BACKENDS)
def test_gspo_loss_and_gradient_are_the_papers_sequence_objective(backend):
    """ratio="sequence" per token, aggregated per sequence (seq-mean-token-mean), gives GSPO's
    objective and its gradient: packed sequences, clipped and unclipped ones, both signs of A."""
    logits, labels, old, ref, adv, mask, cu, sequences = _packed_case()
    x = logits.clone().requires_grad_()
    loss, logp, kl = kernels.grpo_loss(x, labels, old, ref, adv, mask, ratio="sequence", cu_seqlens=cu,
                                       clip_ratio_c=None, backend=backend, **KW)
    total = aggregate_loss(loss, mask, mode="seq-mean-token-mean", cu_seqlens=cu).value()
    total.backward()
    x64 = logits.double().requires_grad_()
    want = textbook.gspo(x64, labels, old, ref, adv, mask, sequences, **KW)
    want.backward()
    torch.testing.assert_close(total.double(), want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-6)
    # the case has clipped and unclipped sequences: the token ratio would give another loss
    s = torch.stack([torch.exp((logp - old)[r][mask[r]].mean()) for r in sequences])
    assert ((s < 1 - KW["clip_low"]) | (s > 1 + KW["clip_high"])).any() and \
        ((s > 1 - KW["clip_low"]) & (s < 1 + KW["clip_high"])).any()
    token, _, _ = kernels.grpo_loss(logits, labels, old, ref, adv, mask, clip_ratio_c=None, backend=backend, **KW)
    assert not torch.allclose(token, loss.detach())


@pytest.mark.parametrize("backend", BACKENDS)
def test_gspo_on_a_padded_batch_takes_each_row_as_a_sequence(backend):
    logits, labels, old, ref, adv, mask, cu, sequences = _packed_case(seed=3)
    rows = [r[:4] for r in sequences]  # four rows of four tokens each
    pick = torch.tensor([t for r in rows for t in r])
    shaped = [t[pick].reshape(4, 4, *t.shape[1:]) for t in (logits, labels, old, ref, adv, mask)]
    shaped[5] = shaped[1] != -100
    x = shaped[0].clone().requires_grad_()
    loss, _, _ = kernels.grpo_loss(x, *shaped[1:], ratio="sequence", clip_ratio_c=None, backend=backend, **KW)
    aggregate_loss(loss, shaped[5], mode="seq-mean-token-mean").value().backward()
    x64 = logits[pick].double().requires_grad_()
    want = textbook.gspo(x64, labels[pick], old[pick], ref[pick], adv[pick], shaped[5].reshape(-1),
                         [list(range(4 * i, 4 * i + 4)) for i in range(4)], **KW)
    want.backward()
    torch.testing.assert_close(x.grad.double().reshape(16, -1), x64.grad, rtol=1e-4, atol=1e-6)


def test_gspo_bad_input_is_named():
    logits, labels, old, ref, adv, mask, cu, _ = _packed_case()
    with pytest.raises(ValueError, match="ratio must be 'token' or 'sequence'"):
        kernels.grpo_loss(logits, labels, old, ref, adv, mask, ratio="seq")
    with pytest.raises(ValueError, match="dual clip .* token ratio"):
        kernels.grpo_loss(logits, labels, old, ref, adv, mask, ratio="sequence", cu_seqlens=cu)


@pytest.mark.parametrize("length, want", [(0, 0.0), (60, 0.0), (80, 0.0), (81, -0.05), (90, -0.5), (99, -0.95),
                                          (100, -1.0)])
def test_overlong_penalty_is_dapos_linear_ramp(length, want):
    """DAPO's soft overlong punishment with budget L_max = 100 and buffer L_cache = 20: 0 up to
    L_max - L_cache, then ((L_max - L_cache) - |y|) / L_cache, -1 at the budget; times the
    penalty factor."""
    from megatron_vr1.rl.reward import overlong_shaping

    assert overlong_shaping(length, budget=100, buffer=20, factor=1.0) == pytest.approx(want)
    assert overlong_shaping(length, budget=100, buffer=20, factor=0.5) == pytest.approx(want / 2)
    assert overlong_shaping(length, budget=100, buffer=0, factor=1.0) == 0.0


def test_dynamic_sampling_keeps_the_targets_mixed_groups_in_replica_order():
    """Mixed groups (rewards not all equal) are kept up to the target, each replica's first
    ones, replicas filled in rank order; the kept count is the textbook's min(mixed, target)."""
    from megatron_vr1.rl.dynamic import DynamicSampler, DynamicSamplingSettings, mixed_groups, quota

    rewards = [1, 1, 0, 1, 0, 0, 1, 0, 1, 1, 0.5, 0.5]
    assert mixed_groups(rewards, 2).tolist() == [False, True, False, True, False, False]
    assert mixed_groups(rewards, 3).tolist() == [True, True, True, True]
    counts = [3, 5, 2]
    assert [quota(counts, r, 6) for r in range(3)] == [3, 3, 0]
    assert [quota(counts, r, 20) for r in range(3)] == counts
    sampler = DynamicSampler(DynamicSamplingSettings(enabled=True, max_rounds=3, oversample=2.0), target=2,
                             group_size=2, dp_group=None, device="cpu")
    assert sampler.wants_more([1, 1, 0, 0, 1, 0]) and sampler.mixed == 1
    assert sampler.next_draw(dp_size=1) == 2 and sampler.rounds == 2  # (2 - 1) missing x 2.0
    both = [1, 1, 0, 0, 1, 0] + [0, 1, 1, 0]
    assert not sampler.wants_more(both) and sampler.mixed == 3
    assert sampler.keep(both).tolist() == [False, False, True, True, False]
    assert sampler.metrics() == {"dynamic_sampling_rounds": 2, "groups_kept": 2, "groups_generated": 5}
    # the rounds run out: it trains on what it has
    short = DynamicSampler(DynamicSamplingSettings(enabled=True, max_rounds=1), target=4, group_size=2,
                           dp_group=None, device="cpu")
    assert not short.wants_more([1, 0, 1, 1]) and short.keep([1, 0, 1, 1]).tolist() == [True, False]


@pytest.mark.parametrize("overrides, message", [
    ({"dynamic_sampling": {"enabled": True, "max_rounds": 0}}, r"max_rounds must be >= 1"),
    ({"dynamic_sampling": {"oversample": 0.5}}, r"oversample must be >= 1"),
    ({"dynamic_sampling": {"rounds": 2}}, r"unknown option\(s\) rl.dynamic_sampling.rounds"),
    ({"reward": {"overlong_buffer": 5000}}, r"overlong_buffer \(5000\) is longer than stage 1's budget of 4096"),
    ({"reward": {"overlong_penalty": -1.0}}, r"overlong_penalty must be >= 0"),
    ({"loss": {"ratio": "sequence"}}, r"ratio=sequence \(GSPO\) aggregates per sequence: set "
                                      r"rl.loss.aggregation=seq-mean-token-mean"),
    ({"loss": {"ratio": "sentence"}}, r"rl.loss.ratio must be token or sequence"),
], ids=["no-rounds", "undersample", "unknown-key", "buffer-past-budget", "negative-penalty", "gspo-token-mean",
        "unknown-ratio"])
def test_contradictory_or_out_of_range_variant_options_name_themselves(overrides, message):
    from omegaconf import OmegaConf

    from megatron_vr1.errors import UsageError
    from megatron_vr1.rl.settings import check_rl_settings, dynamic_sampling_settings

    rl = OmegaConf.merge(OmegaConf.load("conf/rl/ptst.yaml"), overrides)
    with pytest.raises(UsageError, match=message):
        check_rl_settings(rl)
        dynamic_sampling_settings(rl)


def test_gspo_without_its_own_clip_range_takes_the_published_one_and_says_so():
    from omegaconf import OmegaConf

    from megatron_vr1.rl.settings import check_rl_settings, gspo_clip_note

    rl = OmegaConf.merge(OmegaConf.load("conf/rl/ptst.yaml"),
                         {"loss": {"ratio": "sequence", "aggregation": "seq-mean-token-mean"}})
    loss, _ = check_rl_settings(rl)
    assert (loss.sequence_clip_low, loss.sequence_clip_high) == (3e-4, 4e-4)
    assert "GSPO's published sequence_clip_low=0.0003, sequence_clip_high=0.0004" in gspo_clip_note(rl)
    assert gspo_clip_note(OmegaConf.load("conf/rl/gspo.yaml")) is None


def test_the_variant_learning_bench_runs_the_demos_steps_with_each_variants_overrides(tmp_path):
    """tools/bench_variants.py (whether each variant learns: too slow for the suite) plans the
    demo's own steps: the variant's overrides reach its GRPO run and its shuffled-reward control,
    after the demo's RL settings, from the shared cold start."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "bench_variants.py"
    spec = importlib.util.spec_from_file_location("bench_variants", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for name, overrides in bench.VARIANTS.items():
        steps = bench.steps_for(tmp_path / name, 3, overrides)
        for run in ("rl", "control"):
            argv = steps[run].argv
            assert argv[:2] == ["-m", "megatron_vr1.rl"] and "seed=3" in argv, argv
            end = next(i for i, a in enumerate(argv) if a.startswith("checkpoint.dir="))
            assert argv[end - len(overrides):end] == overrides, argv  # last of the RL settings: they win
            assert f"init_from={tmp_path / name / 'sft' / 'iter_0000060'}" in argv
        assert "rl.reward.shuffle=true" in steps["control"].argv
        assert "steps: 28" in " ".join(steps["rl"].argv)  # the demo test's shortened stages
