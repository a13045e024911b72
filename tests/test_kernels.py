"""RL kernels (Triton, run by Triton's interpreter on CPU) vs the torch reference vs the textbook."""

import pytest
import torch

import megatron_vr1.kernels as kernels
import textbook
from megatron_vr1.kernels import aggregate_loss, shift_labels

# backend="triton" runs the kernels compiled on a GPU when there is one (inputs copied there,
# results copied back, gradients flowing through the copies), else in Triton's interpreter.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _on_device(fn):
    def call(*args, backend="auto", **kw):
        if backend != "triton" or DEVICE == "cpu":
            return fn(*args, backend=backend, **kw)
        to = lambda x: x.to(DEVICE) if isinstance(x, torch.Tensor) else x  # noqa: E731
        out = fn(*map(to, args), backend=backend, **{k: to(v) for k, v in kw.items()})
        return tuple(o.cpu() for o in out) if isinstance(out, tuple) else out.cpu()
    return call


group_advantages, token_logprobs, grpo_loss, rms_norm, rotary = map(
    _on_device, (kernels.group_advantages, kernels.token_logprobs, kernels.grpo_loss, kernels.rms_norm,
                 kernels.rotary))

BACKENDS = ["triton", "torch"]
V_RAGGED = 152064  # Qwen's vocab: 37.125 blocks of 4096, so the last block is ragged


# ---------------------------------------------------------------------------- group advantages
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("std", ["unbiased", "population", None])
@pytest.mark.parametrize("sizes", [[1] * 5, [4] * 6, [16] * 3, [3, 1, 5, 8]])
def test_group_advantages_match_textbook(backend, std, sizes):
    g = torch.Generator().manual_seed(len(sizes))
    rewards = (torch.rand(sum(sizes), generator=g) > 0.5).float() + 0.1 * torch.randn(sum(sizes), generator=g)
    group = sizes[0] if len(set(sizes)) == 1 else torch.tensor(sizes)
    ours = group_advantages(rewards, group, std=std, eps=1e-6, backend=backend)
    expected = torch.tensor(textbook.advantages(rewards.tolist(), sizes, std, 1e-6))
    assert ours.dtype == torch.float32 and ours.shape == rewards.shape
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_group_advantage_conventions_differ_as_documented():
    rewards = torch.tensor([1.0, 0, 0, 0, 1, 1, 0, 0])
    unbiased = group_advantages(rewards, 8, std="unbiased", backend="triton")
    population = group_advantages(rewards, 8, std="population", backend="triton")
    # at group size 8 the two conventions differ by sqrt(8/7), about 7%
    torch.testing.assert_close(population / unbiased, torch.full((8,), (8 / 7) ** 0.5))
    assert group_advantages(torch.ones(4), 4, backend="triton").abs().max() == 0  # all equal: no signal


def test_group_advantages_bad_input():
    with pytest.raises(ValueError, match="do not split into groups of 3"):
        group_advantages(torch.ones(8), 3)
    with pytest.raises(ValueError, match="std must be"):
        group_advantages(torch.ones(8), 4, std="sample")
    with pytest.raises(ValueError, match="sum to 8"):
        group_advantages(torch.ones(8), torch.tensor([3, 3]))


# ---------------------------------------------------------------------------- log-probs
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprobs_ragged_vocab(backend, dtype):
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(4, V_RAGGED, generator=g) * 4).to(dtype)
    logits[0, -1] = 30.0  # the winning logit sits in the ragged last block
    labels = torch.tensor([V_RAGGED - 1, 0, 12345, V_RAGGED - 3000])
    ours = token_logprobs(logits, labels, temperature=0.6, backend=backend)
    z = logits.double() / 0.6
    expected = (z - torch.logsumexp(z, -1, keepdim=True)).gather(1, labels[:, None])[:, 0]
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- GRPO loss
def _case(t=8, v=1000, dtype=torch.float32, seed=0, spread=0.2):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(t, v, generator=g) * 3).to(dtype)
    labels = torch.randint(0, v, (t,), generator=g)
    z = logits.double()
    logp = (z - torch.logsumexp(z, -1, keepdim=True)).gather(1, labels[:, None])[:, 0].float()
    old = logp + spread * torch.randn(t, generator=g)
    ref = logp + spread * torch.randn(t, generator=g)
    adv = torch.randn(t, generator=g)
    mask = torch.ones(t, dtype=torch.bool)
    mask[[i for i in (1, 5) if i < t]] = False
    return logits, labels, old, ref, adv, mask


def _run(backend, logits, labels, old, ref, adv, mask, weights=(1.0, 0.3, 0.2), **kw):
    x = logits.detach().clone().requires_grad_()
    loss, logp, kl = grpo_loss(x, labels, old, ref, adv, mask, backend=backend, **kw)
    (weights[0] * loss.sum() + weights[1] * logp.sum() + weights[2] * kl.sum()).backward()
    return loss.detach(), logp.detach(), kl.detach(), x.grad


def _textbook(logits, labels, old, ref, adv, mask, weights=(1.0, 0.3, 0.2), **kw):
    x = logits.detach().double().requires_grad_()
    loss, logp, kl = textbook.grpo(x, labels, old, ref, adv, mask, **kw)
    (weights[0] * loss.sum() + weights[1] * logp.sum() + weights[2] * kl.sum()).backward()
    return loss.detach(), logp.detach(), kl.detach(), x.grad


def _assert_match(ours, expected, rtol, atol):
    for name, a, b in zip(("loss", "logp", "kl", "grad"), ours, expected):
        torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


KW = dict(temperature=0.8, clip_low=0.2, clip_high=0.28, kl_beta=0.04)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grpo_loss_matches_textbook_fp32(backend):
    case = _case(v=V_RAGGED // 16 + 7)
    _assert_match(_run(backend, *case, **KW), _textbook(*case, **KW), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rollout_weights_scale_the_policy_term_as_the_textbook_has_it(backend):
    """Rollout correction: ``loss = w * pg + kl_beta * k3`` with per-token weights (no gradient
    through them), zeros and a cap-sized weight included, against the float64 textbook."""
    case = _case(v=777, spread=0.5)
    w = torch.tensor([1.0, 0.5, 0.0, 2.0, 1.3, 0.7, 0.01, 1.0])
    kw = dict(KW, rollout_weights=w)
    ours, expected = _run(backend, *case, **kw), _textbook(*case, **kw)
    _assert_match(ours, expected, rtol=1e-5, atol=1e-5)
    plain = _run(backend, *case, **KW)
    assert not torch.allclose(ours[3], plain[3])  # the weights did change the gradient
    with pytest.raises(ValueError, match=r"rollout_weights must have shape \[8\]"):
        grpo_loss(*case, rollout_weights=w[:3])


@pytest.mark.parametrize("backend", BACKENDS)
def test_grpo_loss_matches_textbook_bf16(backend):
    case = _case(dtype=torch.bfloat16, v=2053)
    ours = _run(backend, *case, **KW)
    # inputs are bf16 but everything is computed in fp32: 1e-3 relative (the gradient is
    # written back in bf16, so compare it at bf16 resolution)
    expected = _textbook(*case, **KW)
    _assert_match(ours[:3], expected[:3], rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(ours[3].double(), expected[3].to(torch.bfloat16).double(), rtol=1e-2, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_triton_and_torch_agree_on_ragged_vocab(backend):
    case = _case(t=3, v=V_RAGGED, seed=4)
    _assert_match(_run(backend, *case, **KW), _run("torch", *case, **KW), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_rows_zero_advantage_and_extreme_ratios(backend):
    logits, labels, old, ref, adv, mask = _case(t=8, v=777, seed=2)
    adv[0] = 0.0                         # no policy-gradient signal, only KL
    old[2] = old[2] - 30.0               # ratio e^30 with A>0 -> clipped, no pg gradient
    adv[2] = abs(float(adv[2])) + 0.5
    old[3] = old[3] + 30.0               # ratio e^-30 with A<0 -> clipped
    adv[3] = -abs(float(adv[3])) - 0.5
    old[4] = old[4] - 30.0               # ratio e^30 with A<0 -> dual-clipped at -3A, no pg gradient
    adv[4] = -0.5
    logits[5] = float("nan")             # masked: never read
    case = (logits, labels, old, ref, adv, mask)
    ours, expected = _run(backend, *case, **KW), _textbook(*case, **KW)
    _assert_match(ours, expected, rtol=1e-5, atol=1e-5)
    loss, logp, kl, grad = ours
    assert loss[1] == 0 and logp[1] == 0 and kl[1] == 0 and (grad[[1, 5]] == 0).all()
    # clipped rows: only the KL and logp terms act
    kl_only = _run(backend, *case, weights=(0.0, 0.3, 0.2), **KW)[3]
    for row in (2, 3, 4):
        kl_grad = _run(backend, *case, weights=(1.0, 0.0, 0.0), **dict(KW, kl_beta=0.0))[3][row]
        assert kl_grad.abs().max() == 0, row
    assert torch.isfinite(kl_only).all()
    assert loss[4] == pytest.approx(0.5 * 3 + 0.04 * float(kl[4]), rel=1e-6)  # -A * clip_ratio_c + beta * k3
    # without the dual clip the same row is the unbounded PPO loss, as the textbook has it
    no_dual = dict(KW, clip_ratio_c=None)
    _assert_match(_run(backend, *case, **no_dual), _textbook(*case, **no_dual), rtol=1e-5, atol=1e-5)
    assert _run(backend, *case, **no_dual)[0][4] > 1e10


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_masked(backend):
    logits, labels, old, ref, adv, _ = _case(t=4, v=300)
    mask = torch.zeros(4, dtype=torch.bool)
    loss, logp, kl, grad = _run(backend, logits, labels, old, ref, adv, mask, **KW)
    assert not loss.any() and not logp.any() and not kl.any() and not grad.any()


def test_inplace_backward_reuses_the_logits_storage():
    case = _case(v=513)
    expected = _run("triton", *case, **KW)[3]
    x = case[0].to(DEVICE).clone().requires_grad_()
    loss, _, _ = kernels.grpo_loss(x, *(t.to(DEVICE) for t in case[1:]), backend="triton", inplace_backward=True,
                                   **KW)
    loss.sum().backward()
    plain = _run("triton", *case, weights=(1.0, 0.0, 0.0), **KW)[3]
    torch.testing.assert_close(x.grad.cpu(), plain)
    # the gradient was written over the logits themselves (autograd then copies it into the
    # leaf's .grad here; a non-leaf logits tensor passes it on without a copy)
    torch.testing.assert_close(x.detach().cpu(), plain)
    assert not torch.equal(expected, plain)  # the logp/kl terms matter in the first call


_ROWS_PAST_2_31 = """
import os, sys, torch
dev = "cuda" if torch.cuda.is_available() else "cpu"
if dev == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
from megatron_vr1.kernels import grpo_loss, token_logprobs
V, stride = 1000, 2**30 + 8  # the stride fits int32, but row 2 starts past 2^31 elements
try:  # 4.3 GB; on CPU only address space: only the three rows' pages are ever touched
    storage = torch.empty(2 * stride + V, dtype=torch.bfloat16, device=dev)
except (RuntimeError, torch.OutOfMemoryError):
    sys.exit(3)
logits = storage.as_strided((3, V), (stride, 1))
logits.copy_((torch.randn(3, V, generator=torch.Generator().manual_seed(0)) * 3).to(torch.bfloat16))
labels = torch.tensor([5, 7, 9], device=dev)
z = logits.float()
expected = torch.log_softmax(z, -1)[[0, 1, 2], labels]
torch.testing.assert_close(token_logprobs(logits, labels, backend="triton"), expected)
grad = torch.softmax(z, -1).neg().index_put_((torch.arange(3, device=dev), labels), torch.tensor(1.0, device=dev),
                                              accumulate=True)
for inplace in (False, True):  # in place, the gradient's rows sit past 2^31 elements too
    x = logits.detach().clone() if not inplace else logits.detach()
    x = x.as_strided((3, V), (stride, 1)) if inplace else x
    x.requires_grad_()
    loss, logp, _ = grpo_loss(x, labels, expected, expected, torch.ones(3, device=dev),
                              torch.ones(3, dtype=torch.bool, device=dev), backend="triton", inplace_backward=inplace)
    logp.sum().backward()
    torch.testing.assert_close(x.grad.float(), grad, rtol=2e-2, atol=2e-3)
print("ok")
"""


def test_rows_past_2_31_elements_use_int64_offsets():
    """Row offsets are int64: with int32 ones, row 2 of a [3, V] view strided 2^30 wraps (and
    crashes or reads garbage). Runs in its own process so a crash fails this test alone."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _ROWS_PAST_2_31], capture_output=True, text=True, timeout=300)
    if proc.returncode == 3:
        pytest.skip("this machine refuses the 4.3 GB the view spans")
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", (proc.returncode, proc.stderr[-3000:])


# ---------------------------------------------------------------------------- packed batches
def test_shift_labels_never_cross_sequences():
    ids = torch.arange(10, 20)
    cu = torch.tensor([0, 3, 7, 10])
    labels = shift_labels(ids, cu)
    expected = []
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        expected += ids[s + 1:e].tolist() + [-100]
    assert labels.tolist() == expected


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_loss_and_aggregations_equal_sequences_alone(backend):
    g = torch.Generator().manual_seed(3)
    lengths = [5, 9, 3, 7]
    cu = torch.nn.functional.pad(torch.tensor(lengths).cumsum(0), (1, 0))
    ids = torch.randint(0, 400, (sum(lengths),), generator=g)
    logits = torch.randn(sum(lengths), 400, generator=g)
    labels = shift_labels(ids, cu)
    mask = labels != -100
    mask[[0, 6]] = False  # e.g. prompt tokens
    old, ref, adv = (torch.randn(sum(lengths), generator=g) * 0.1 - 6 for _ in range(3))
    w = torch.rand(sum(lengths), generator=g) * 2  # rollout correction weights follow their tokens
    per_token, _, _ = grpo_loss(logits, labels, old, ref, adv, mask, backend=backend, rollout_weights=w, **KW)
    per_seq, all_tokens = [], []
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        lab = ids[s + 1:e]
        loss, _, _ = grpo_loss(logits[s:e - 1], lab, old[s:e - 1], ref[s:e - 1], adv[s:e - 1], mask[s:e - 1],
                               backend=backend, rollout_weights=w[s:e - 1], **KW)
        torch.testing.assert_close(loss, per_token[s:e - 1])
        keep = mask[s:e - 1]
        per_seq.append(loss[keep].mean())
        all_tokens.append(loss[keep])
    flat = torch.cat(all_tokens)
    agg = lambda mode, **kw: aggregate_loss(per_token, mask, mode=mode, cu_seqlens=cu, **kw).value()  # noqa: E731
    torch.testing.assert_close(agg("token-mean"), flat.mean())
    torch.testing.assert_close(agg("seq-mean-token-mean"), torch.stack(per_seq).mean())
    torch.testing.assert_close(agg("dr-grpo", max_response_length=16), flat.sum() / (len(lengths) * 16))


# ---------------------------------------------------------------------------- bad input
def test_bad_input_gets_clear_errors():
    logits, labels, old, ref, adv, mask = _case(t=4, v=100)
    with pytest.raises(ValueError, match=r"old_logprobs must have shape \[4\]"):
        grpo_loss(logits, labels, old[:3], ref, adv, mask)
    with pytest.raises(ValueError, match="contiguous along the vocab"):
        grpo_loss(logits.t().contiguous().t(), labels, old, ref, adv, mask)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 100\)"):
        grpo_loss(logits, labels + 100, old, ref, adv, mask)
    with pytest.raises(ValueError, match=r"logits must be \[tokens, vocab\]"):
        token_logprobs(logits[0], labels[:1])
    with pytest.raises(ValueError, match=r"labels must have shape \[1, 4\]"):
        token_logprobs(logits[None], labels)
    with pytest.raises(ValueError, match=r"clip_ratio_c must exceed 1 \+ clip_high"):
        grpo_loss(logits, labels, old, ref, adv, mask, clip_ratio_c=1.1, clip_high=0.2)
    with pytest.raises(ValueError, match="backend must be"):
        grpo_loss(logits, labels, old, ref, adv, mask, backend="cuda")
    with pytest.raises(ValueError, match="max_response_length"):
        aggregate_loss(torch.ones(3), torch.ones(3), mode="dr-grpo")
    # out-of-range labels on masked rows (e.g. -100 padding) are fine
    bad = labels.clone()
    bad[~mask] = -100
    grpo_loss(logits, bad, old, ref, adv, mask)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_stays_in_its_token(backend):
    logits, labels, old, ref, adv, mask = _case(t=6, v=200)
    logits[3, 17] = float("nan")
    loss, logp, kl, grad = _run(backend, logits, labels, old, ref, adv, mask, **KW)
    assert torch.isnan(loss[3]) and torch.isnan(grad[3]).all()
    others = [0, 2, 4]
    assert torch.isfinite(loss[others]).all() and torch.isfinite(grad[others]).all()


# ---------------------------------------------------------------------------- vocab-parallel
@pytest.mark.parametrize("tp", [2, 4])
def test_vocab_parallel_matches_textbook(tmp_path, tp):
    import json

    from conftest import run_torchrun

    run_torchrun("dist/kernels_worker.py", tp, str(tmp_path))
    results = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank*.json"))]
    assert len(results) == tp
    for r in results:
        for backend in ("triton", "torch"):
            errs = r[backend]
            assert max(errs["loss"], errs["logp"], errs["kl"], errs["token_logprobs"]) <= 1e-5, errs
            assert errs["grad"] <= 1e-5 * max(1.0, errs["grad_scale"]), errs
            assert errs["gspo_value"] <= 1e-5 and errs["gspo_grad"] <= 1e-6, errs  # GSPO's ratio, vocab-parallel
        assert "labels must lie in [0, 152064)" in r["out_of_range_error"]


def test_triton_on_cpu_without_the_interpreter_is_a_clear_error(monkeypatch):
    logits, labels, old, ref, adv, mask = _case(t=2, v=64)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.grpo_loss(logits, labels, old, ref, adv, mask, backend="triton")


def test_benchmark_script_runs(tmp_path):
    """A smoke run of kernels/bench (CPU sizes): the script works and prints every implementation."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "kernels" / "bench" / "bench_grpo_loss.py"
    proc = subprocess.run([sys.executable, str(script), "--tokens", "32", "--vocab", "2048", "--iters", "1",
                           "--no-compile", "--configs", "1024x4", "512x2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (not a GPU figure)") in proc.stdout
    for name in ("triton (ours 1024x4)", "triton (ours 512x2, in-place grad)", "torch eager"):
        assert f"| 32 | {name} |" in proc.stdout


def test_kernels_compile_for_a100_and_hopper_without_spills():
    """The interpreter checks arithmetic, not code generation: compile every kernel for sm_80 and
    sm_90 with Triton's own ptxas (no GPU needed) and check what the GPU would run."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "megatron_vr1.kernels.compile_check", "--json"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = [json.loads(line) for line in proc.stdout.splitlines()]
    kernels_run = ("row_stats", "row_stats+terms", "token_terms", "grad_logits", "group_advantage", "rms_norm",
                   "rms_norm_backward", "rotary", "rotary_backward")
    assert {(r["kernel"], r["arch"]) for r in found} >= {(k, a) for k in kernels_run for a in (80, 90)}
    for r in found:
        where = f"{r['kernel']} sm_{r['arch']} {r['dtype']}"
        assert r["local_bytes"] == 0, f"{where} spills registers to local memory"
        # <= 64 registers keeps >= 32 warps resident per SM: enough loads in flight to stream HBM
        assert r["registers"] <= 64, f"{where} uses {r['registers']} registers"
        if r["kernel"] != "group_advantage":
            # the logits stream through 16-byte vector loads (and the gradient through 16-byte stores)
            assert "LDG.E.128" in r["loads"], f"{where} loads the logits without 128-bit vectors: {r['loads']}"
        if r["kernel"] == "grad_logits":
            assert "STG.E.128" in r["stores"], f"{where} stores the gradient without 128-bit vectors: {r['stores']}"


def test_public_names_survive_the_triton_path():
    """Running the Triton path imports the kernel modules; none may shadow a public function."""
    logits, labels, old, ref, adv, mask = _case(t=3, v=64)
    grpo_loss(logits, labels, old, ref, adv, mask, backend="triton")
    token_logprobs(logits, labels, backend="triton")
    group_advantages(torch.ones(4), 2, backend="triton")
    rms_norm(torch.ones(2, 8), torch.ones(8), backend="triton")
    rotary(torch.ones(2, 1, 1, 8), torch.ones(2, 1, 1, 8), backend="triton")
    for name in kernels.__all__:
        assert not isinstance(getattr(kernels, name), type(kernels)), name  # a module shadowing a public name


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_advantages_by_group_ids_in_any_order(backend):
    g = torch.Generator().manual_seed(5)
    sizes = [4, 1, 6, 3]
    rewards = torch.randn(sum(sizes), generator=g)
    ids = torch.repeat_interleave(torch.tensor([7, 2, 9, 4]), torch.tensor(sizes))
    perm = torch.randperm(len(ids), generator=g)
    ours = group_advantages(rewards[perm], group_ids=ids[perm], std="population", backend=backend)
    expected = torch.tensor(textbook.advantages(rewards.tolist(), sizes, "population", 1e-6))
    torch.testing.assert_close(ours, expected[perm], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="not both"):
        group_advantages(rewards, 4, group_ids=ids)


# ---------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_block_of_minus_inf_logits(backend):
    """Banned ids masked to -inf across a whole leading vocab block: the online max starts at
    -inf and must not turn the running sum into NaN."""
    logits, labels, old, ref, adv, mask = _case(t=3, v=5000)
    logits[0, :4096] = float("-inf")
    labels[0] = 4500
    ours = _run(backend, logits, labels, old, ref, adv, mask, **KW)
    keep = mask.clone()
    expected = _textbook(logits, labels, old, ref, adv, keep, **KW)
    _assert_match(ours, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_signal_gives_no_nan_even_when_exp_overflows(backend):
    """A = 0 with a ratio past fp32's range, and kl_beta = 0 with k3 past it: the switched-off
    term contributes 0, not 0 * inf = NaN, to the loss and the gradient."""
    logits, labels, old, ref, adv, mask = _case(t=4, v=300)
    mask[:] = True
    logp = _textbook(logits, labels, old, ref, adv, mask, **KW)[1].float()
    adv[0], old[0] = 0.0, logp[0] - 100.0  # ratio e^100 on a token with no advantage
    ref[1] = logp[1] + 100.0  # k3 = e^100 - 101 once the log-ratio bound is lifted past 100
    x = logits.clone().requires_grad_()
    loss, _, kl = grpo_loss(x, labels, old, ref, adv, mask, backend=backend,
                            **dict(KW, kl_beta=0.0, kl_log_ratio_max=200.0, kl_max=None))
    loss.sum().backward()  # the objective leaves k3 out (0 * inf would be NaN in the forward too)
    grad = x.grad
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all(), (loss, grad.isfinite().all(1))
    assert loss[0] == 0 and not grad[0].any()
    assert torch.isinf(kl[1])  # still reported for logging
    expected = _textbook(logits, labels, old, ref, adv, mask, **dict(KW, kl_beta=0.0))
    torch.testing.assert_close(loss[1:], expected[0][1:].float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_labels_and_non_bool_masks(backend):
    logits, labels, old, ref, adv, _ = _case(t=4, v=64)
    wide = torch.stack([labels, torch.full_like(labels, 10_000)], 1)  # every other id is junk
    strided = wide[:, 0]
    assert not strided.is_contiguous()
    expected = token_logprobs(logits, labels, backend="torch")
    torch.testing.assert_close(token_logprobs(logits, strided, backend=backend), expected)
    float_mask = torch.tensor([1.0, 0.5, 1.0, 0.0])  # any nonzero keeps its token, as .bool() reads it
    int_mask = torch.tensor([1, 256, 1, 0])
    for mask in (float_mask, int_mask):
        got = token_logprobs(logits, labels, mask=mask, backend=backend)
        torch.testing.assert_close(got, torch.where(mask.bool(), expected, 0.0))
        loss = grpo_loss(logits, labels, old, ref, adv, mask, backend=backend, **KW)[0]
        assert (loss != 0).tolist() == mask.bool().tolist()


def test_more_bad_input():
    logits, labels, old, ref, adv, mask = _case(t=4, v=100)
    for temperature in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="temperature must be a positive"):
            grpo_loss(logits, labels, old, ref, adv, mask, temperature=temperature)
        with pytest.raises(ValueError, match="temperature must be a positive"):
            token_logprobs(logits, labels, temperature=temperature)
    with pytest.raises(ValueError, match=r"mask must have shape \[4\]"):
        grpo_loss(logits, labels, old, ref, adv, mask[:3])
    with pytest.raises(ValueError, match=r"must be \[T\] or \[1, T\]"):
        shift_labels(torch.zeros(2, 5, dtype=torch.long), torch.tensor([0, 5, 10]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batches(backend):
    assert group_advantages(torch.empty(0), 4, backend=backend).shape == (0,)
    assert group_advantages(torch.empty(0), group_ids=torch.empty(0, dtype=torch.long), backend=backend).shape == (0,)
    logits, labels, old, ref, adv, mask = (x[:0] for x in _case(t=2, v=64))
    loss, logp, kl, grad = _run(backend, logits, labels, old, ref, adv, mask, **KW)
    assert loss.shape == logp.shape == kl.shape == (0,) and grad.shape == (0, 64)
    for mode in ("token-mean", "seq-mean-token-mean", "dr-grpo"):
        assert aggregate_loss(loss, mask, mode=mode, max_response_length=8).value() == 0


def test_torch_reference_gradients_reach_the_logits_only():
    logits, labels, old, ref, adv, mask = _case(t=4, v=64)
    old, adv = old.clone().requires_grad_(), adv.clone().requires_grad_()
    x = logits.clone().requires_grad_()
    grpo_loss(x, labels, old, ref, adv, mask, backend="torch", **KW)[0].sum().backward()
    assert x.grad is not None and old.grad is None and adv.grad is None


def test_shift_labels_of_a_padded_batch_stay_in_their_rows():
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    assert shift_labels(ids).tolist() == [[2, 3, -100], [5, 6, -100]]
    packed = torch.tensor([[1, 2, 3, 4, 5]])
    assert shift_labels(packed, torch.tensor([0, 2, 5])).tolist() == [[2, -100, 4, 5, -100]]


def test_dr_grpo_counts_every_sequence_given():
    per_token = torch.ones(5)
    mask = torch.ones(5)
    for cu in ([0, 3, 5, 5], [0, 0, 3, 5], [0, 3, 3, 5]):  # an empty sequence anywhere counts the same
        got = aggregate_loss(per_token, mask, mode="dr-grpo", cu_seqlens=torch.tensor(cu), max_response_length=4)
        torch.testing.assert_close(got.value(), torch.tensor(5 / (3 * 4)))


def test_shift_labels_of_padded_rows_never_label_padding():
    right, left = torch.tensor([[5, 6, 0, 0]]), torch.tensor([[0, 0, 5, 6]])
    assert shift_labels(right, attention_mask=right != 0).tolist() == [[6, -100, -100, -100]]
    assert shift_labels(left, attention_mask=left != 0).tolist() == [[-100, -100, 6, -100]]
    # only targets (e.g. assistant tokens) become labels, in packed and padded batches alike
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    target = torch.tensor([[0, 0, 1, 1, 0, 1]], dtype=torch.bool)
    assert shift_labels(ids, target_mask=target).tolist() == [[-100, 3, 4, -100, 6, -100]]
    assert shift_labels(ids, torch.tensor([0, 3, 6]), target_mask=target).tolist() == [[-100, 3, -100, -100, 6, -100]]
    # rows past the last sequence are padding (a packed batch padded to a multiple of TP)
    assert shift_labels(ids, torch.tensor([0, 2, 4])).tolist() == [[2, -100, 4, -100, -100, -100]]
    with pytest.raises(ValueError, match="cu_seqlens must rise from 0"):
        shift_labels(ids, torch.tensor([0, 4, 2]))
    with pytest.raises(ValueError, match="cu_seqlens must rise from 0"):
        shift_labels(ids, torch.tensor([0, 7]))


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "dr-grpo"])
def test_loss_sums_over_micro_batches_give_the_global_objective(mode):
    """Uneven micro-batches: ten 1s in one, one 0 in the other. Per-call means would give 0.5
    for the token mean; the global objective is 10/11."""
    g = torch.Generator().manual_seed(0)
    parts = [(torch.ones(10), [0, 4, 10]), (torch.zeros(1), [0, 1]), (torch.rand(7, generator=g), [0, 3, 3, 7])]
    sums = [aggregate_loss(loss, torch.ones_like(loss), mode=mode, cu_seqlens=torch.tensor(cu), max_response_length=6)
            for loss, cu in parts]
    total, count = sum(s.total for s in sums), sum(s.count for s in sums)
    whole = torch.cat([loss for loss, _ in parts])
    cu_whole = torch.tensor([0, 4, 10, 11, 14, 14, 18])
    expected = aggregate_loss(whole, torch.ones_like(whole), mode=mode, cu_seqlens=cu_whole, max_response_length=6)
    torch.testing.assert_close(total / count, expected.value())
    if mode == "token-mean":
        first_two = (sums[0].total + sums[1].total) / (sums[0].count + sums[1].count)
        assert first_two.item() == pytest.approx(10 / 11)
    naive = torch.stack([s.value() for s in sums]).mean()
    assert not torch.isclose(naive, expected.value())


def test_padded_rows_are_sequences_of_their_own():
    per_token = torch.tensor([[1.0, 3.0, 0.0], [2.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert aggregate_loss(per_token, mask, mode="seq-mean-token-mean").value() == pytest.approx((2.0 + 2.0) / 2)
    assert aggregate_loss(per_token, mask, mode="dr-grpo", max_response_length=3).value() == pytest.approx(6 / 6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_k3_log_ratio_is_bounded(backend):
    logits, labels, old, ref, adv, mask = _case(t=4, v=300, seed=7)
    ref = ref.clone()
    ref[2] = ref[2] + 60.0  # ref - logp far beyond the bound: exp would overflow fp32
    loss, logp, kl, grad = _run(backend, logits, labels, old, ref, adv, mask, weights=(0.0, 0.0, 1.0),
                                **dict(KW, kl_max=None))
    d = 20.0
    assert kl[2].item() == pytest.approx(torch.tensor(d).exp().item() - d - 1, rel=1e-5)
    assert torch.isfinite(loss).all() and (grad[2] == 0).all() and grad[0].abs().sum() > 0
    _assert_match(_run(backend, logits, labels, old, ref, adv, mask, **KW),
                  _textbook(logits, labels, old, ref, adv, mask, **KW), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kl_max", [10.0, 1.0, None])
def test_k3_value_is_bounded_by_kl_max(backend, kl_max):
    """k3 is clamped to [-kl_max, kl_max] with no gradient where the clamp holds (verl's bound):
    value and gradient against the float64 textbook, for rows on both sides of the bound."""
    logits, labels, old, ref, adv, mask = _case(t=8, v=300, seed=11)
    z = logits.double() / KW["temperature"]
    logp = (z - torch.logsumexp(z, -1, keepdim=True)).gather(1, labels[:, None])[:, 0].float()
    # ref - logp = d gives k3 = e^d - d - 1: 0.08 (d=0.4), 4.4 (2), 15 (3), 5e3 (9), 2.05 (-3), 4.9e8 (20+);
    # rows 1 and 5 are off the mask
    for row, d in enumerate([0.4, 1.2, 2.0, 3.0, 9.0, 25.0, 25.0, -3.0]):
        ref[row] = logp[row] + d
    weights = (1.0, 0.0, 0.5)  # the KL term through the loss and through k3 itself
    ours = _run(backend, logits, labels, old, ref, adv, mask, weights=weights, **dict(KW, kl_max=kl_max))
    _assert_match(ours, _textbook(logits, labels, old, ref, adv, mask, weights=weights, **dict(KW, kl_max=kl_max)),
                  rtol=1e-5, atol=1e-5)
    kl, grad = ours[2], ours[3]
    if kl_max is None:
        assert kl.max() > 1e8  # d = 25 is held at 20 by kl_log_ratio_max alone
    else:
        assert kl.max() <= kl_max + 1e-6
        # rows where the bound holds carry the policy term's gradient only: the same as with no KL
        bounded = (kl >= kl_max - 1e-6) & mask
        assert bounded.any()
        no_kl = _run(backend, logits, labels, old, ref, adv, mask, weights=(1.0, 0.0, 0.0), **dict(KW, kl_beta=0.0))
        torch.testing.assert_close(grad[bounded], no_kl[3][bounded], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="kl_max must be positive"):
        kernels.grpo_loss(logits, labels, old, ref, adv, mask, kl_max=0.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_logits_take_the_model_layout(backend):
    """``[1, T, V]`` logits with ``[1, T]`` per-token tensors (the packed batch's layout)."""
    case = _case(t=6, v=500, seed=9)
    flat = _run(backend, *case, **KW)
    logits, *rest = case
    batched = grpo_loss(logits[None], *(x[None] for x in rest), backend=backend, **KW)
    assert all(b.shape == (1, 6) for b in batched)
    for a, b in zip(flat[:3], batched):
        torch.testing.assert_close(a, b[0])
    lp = token_logprobs(logits[None], rest[0][None], mask=rest[-1][None], temperature=0.8, backend=backend)
    torch.testing.assert_close(lp[0], flat[1])


def test_token_entropy_matches_the_definition():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 7, 300, generator=g) * 2
    got = kernels.token_entropy(logits, temperature=0.7)
    p = torch.softmax(logits.double() / 0.7, -1)
    torch.testing.assert_close(got.double(), -(p * p.log()).sum(-1), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- RMSNorm
@pytest.mark.parametrize("rows,hidden", [(37, 48), (5, 100), (16, 64)])
def test_rms_norm_matches_textbook_forward_and_backward(rows, hidden):
    """The Triton RMSNorm (interpreter) against the formula in float64: output, d x and d w, with
    a hidden size that is not a power of two and a row count off the backward's row blocks."""
    gen = torch.Generator().manual_seed(rows * hidden)
    x = (torch.randn(2, rows, hidden, generator=gen) * 3).requires_grad_()
    w = (torch.rand(hidden, generator=gen) + 0.5).requires_grad_()
    g = torch.randn(2, rows, hidden, generator=gen)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    want = w64 * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6)
    want.backward(g.double())
    got = rms_norm(x, w, 1e-6, backend="triton")
    got.backward(g)
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-4)


def test_rms_norm_bf16_takes_qwens_casts():
    """In bf16 the kernel casts the normalised input to bf16 before the weight, as the unfused
    module does: its output equals that module's to bf16 rounding, and so do the gradients."""
    from megatron_vr1.kernels import reference

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(24, 80, generator=gen).bfloat16().requires_grad_()
    w = (torch.rand(80, generator=gen) + 0.5).bfloat16().requires_grad_()
    g = torch.randn(24, 80, generator=gen).bfloat16()
    got = rms_norm(x, w, 1e-6, backend="triton")
    got.backward(g)
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    want = reference.rms_norm(x, w, 1e-6)
    want.backward(g)
    assert got.dtype == want.dtype == torch.bfloat16
    assert (got.float() - want.float()).abs().max() <= 2 ** -7 * want.float().abs().max()
    assert (gx.float() - x.grad.float()).abs().max() <= 2 ** -6 * x.grad.float().abs().max()
    assert (gw.float() - w.grad.float()).abs().max() <= 2 ** -6 * w.grad.float().abs().max()


def test_rms_norm_bad_input_is_named():
    with pytest.raises(ValueError, match=r"weight must have shape \[8\]"):
        rms_norm(torch.ones(2, 8), torch.ones(4))
    with pytest.raises(ValueError, match="eps must be positive"):
        rms_norm(torch.ones(2, 8), torch.ones(8), 0.0)


# ---------------------------------------------------------------------------- rotary
@pytest.mark.parametrize("shape,freq_shape", [
    ((7, 1, 4, 16), (7, 1, 1, 16)),    # the LM: every channel rotated, one angle row per position
    ((5, 3, 2, 80), (5, 3, 1, 40)),    # per-sequence angles (a padded batch), half the channels (ViT-like, ragged)
    ((9, 6, 24), (9, 1, 1, 24)),       # packed [T, H, D]
])
def test_rotary_matches_textbook_and_megatron_forward_and_backward(shape, freq_shape):
    """The Triton rotary (interpreter) against the formula in float64 (output and d t) and
    against megatron-core's unfused path, which it stands in for."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    gen = torch.Generator().manual_seed(sum(shape))
    t = torch.randn(*shape, generator=gen).requires_grad_()
    freqs = torch.rand(*freq_shape, generator=gen) * 20
    g = torch.randn(*shape, generator=gen)
    t64 = t.detach().double().requires_grad_()
    f64 = freqs.double()
    rot = freq_shape[-1]
    x, rest = t64[..., :rot], t64[..., rot:]
    x1, x2 = x[..., :rot // 2], x[..., rot // 2:]
    c, s_ = f64.cos(), f64.sin()
    if len(shape) == 3:
        c, s_ = c[:, 0], s_[:, 0]
    want = torch.cat((x * c + torch.cat((-x2, x1), -1) * s_, rest), -1)
    want.backward(g.double())
    got = rotary(t, freqs, backend="triton")
    got.backward(g)
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(t.grad.double(), t64.grad, rtol=1e-5, atol=1e-5)
    if len(shape) == 4:
        torch.testing.assert_close(got, _apply_rotary_pos_emb_bshd(t.detach(), freqs), rtol=1e-5, atol=1e-5)


def test_rotary_bf16_rounds_like_megatron():
    """In bf16, cos and sin are cast to bf16 before they multiply, as in megatron-core's path:
    the two agree to bf16 rounding."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    gen = torch.Generator().manual_seed(5)
    t = torch.randn(6, 2, 4, 32, generator=gen).bfloat16()
    freqs = torch.rand(6, 1, 1, 32, generator=gen) * 50
    got, want = rotary(t, freqs, backend="triton"), _apply_rotary_pos_emb_bshd(t, freqs)
    assert got.dtype == torch.bfloat16
    assert (got.float() - want.float()).abs().max() <= 2 ** -6 * want.float().abs().max()


def test_rotary_bad_layout_is_named():
    with pytest.raises(ValueError, match=r"freqs must be \[S, 1, 1, r\]"):
        kernels.rotary(torch.ones(4, 2, 2, 8), torch.ones(4, 2, 2, 8))
    with pytest.raises(ValueError, match="even r <= D"):
        kernels.rotary(torch.ones(4, 1, 2, 8), torch.ones(4, 1, 1, 10))

