"""One optimizer step under ``torch.profiler``: where the time goes, kernel by kernel.

``metrics.profile_step=N`` profiles step N on global rank 0 and writes
``<checkpoint.dir>/profile/step_N.json``: one entry per operator or kernel with its self time on
the device and on the host, and its call count, longest device time first. ``time_categories``
folds such a list into GEMMs, attention, the loss, the optimizer, communication, element-wise
kernels (norms, rotary, activations, copies: what fusion would remove) and the rest;
``host_syncs`` counts the times the step waited for the device.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator, Optional

import torch

# kernel-name fragments, checked in order (lower case)
CATEGORIES = (
    ("attention", ("flash", "fmha", "attention", "sdpa", "softmax_warp")),
    ("loss", ("cross_entropy", "log_softmax", "nll_loss", "grpo", "logsumexp")),
    ("optimizer", ("adam", "multi_tensor", "clip_grad", "l2norm", "_foreach_")),
    ("communication", ("nccl", "all_reduce", "allreduce", "all_gather", "reduce_scatter", "broadcast")),
    ("gemm", ("gemm", "matmul", "nvjet", "cutlass", "xmma", "sm90_", "sm80_", "ampere_", "cublas", "addmm")),
    ("elementwise", ("elementwise_kernel", "vectorized_", "unrolled_elementwise", "reduce_kernel", "index", "cat",
                     "copy", "fill")),
)


PROFILER_EVENTS = ("Command Buffer Full",)  # CUPTI's own records, not kernels


def categorise(name: str) -> str:
    low = name.lower()
    return next((cat for cat, keys in CATEGORIES if any(k in low for k in keys)), "other")


def time_categories(entries: list[dict]) -> dict[str, float]:
    """Device seconds per category over a profile's kernels (operators are not counted: their
    device time is their kernels')."""
    out: dict[str, float] = {}
    for e in entries:
        if e["kernel"] and e["device_us"] > 0:
            out[categorise(e["name"])] = out.get(categorise(e["name"]), 0.0) + e["device_us"] / 1e6
    return out


def host_syncs(entries: list[dict]) -> int:
    """Times the step made the host wait for the device: device-to-host copies (``.item()``,
    ``.tolist()``, ``.cpu()``, a tensor's value deciding a branch) and explicit synchronisations.
    A blocking copy is a ``cudaMemcpyAsync`` followed by a ``cudaStreamSynchronize``: the pair is
    one wait, so stream synchronisations count only beyond the copies (an explicit
    ``stream.synchronize()``), and a non-blocking copy without one still counts."""
    def calls(kernel: bool, match) -> int:
        return sum(e["calls"] for e in entries if bool(e["kernel"]) == kernel and match(e["name"]))

    copies = calls(True, lambda name: "Memcpy DtoH" in name)
    stream_syncs = calls(False, lambda name: name == "cudaStreamSynchronize")
    other_syncs = calls(False, lambda name: name in ("cudaDeviceSynchronize", "cudaEventSynchronize"))
    return max(copies, stream_syncs) + other_syncs


class StepProfiler:
    def __init__(self, step: Optional[int], out_dir: Path, enabled: bool) -> None:
        self.step = int(step) if step is not None else None
        self.out_dir, self.enabled = Path(out_dir), enabled

    @contextlib.contextmanager
    def __call__(self, step: int) -> Iterator[None]:
        if not (self.enabled and step == self.step):
            yield
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            yield
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        entries = []
        for ev in prof.key_averages():
            device = getattr(ev, "self_device_time_total", None)
            if device is None:
                device = getattr(ev, "self_cuda_time_total", 0.0)
            # an operator's device time is that of the kernels it launched: count kernels only
            kernel = ev.device_type != torch.autograd.DeviceType.CPU and ev.key not in PROFILER_EVENTS
            entries.append({"name": ev.key, "kernel": kernel, "device_us": float(device),
                            "cpu_us": float(ev.self_cpu_time_total), "calls": int(ev.count)})
        entries.sort(key=lambda e: (e["device_us"], e["cpu_us"]), reverse=True)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"step_{step}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(entries))
        tmp.replace(path)
