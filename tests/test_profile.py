"""The step profiler's file and the figures read from it: time by category, host-device waits."""

import json

import pytest
import torch

from megatron_vr1.training.profile import StepProfiler, categorise, host_syncs, time_categories


def kernel(name, us=0.0, calls=1):
    return {"name": name, "kernel": True, "device_us": us, "cpu_us": 0.0, "calls": calls}


def host(name, calls=1):
    return {"name": name, "kernel": False, "device_us": 0.0, "cpu_us": 5.0, "calls": calls}


def test_kernels_fall_into_categories_and_operators_are_not_counted_twice():
    assert categorise("ampere_bf16_s16816gemm_bf16_128x64") == "gemm"
    assert categorise("flash_fwd_kernel") == "attention"
    assert categorise("ncclDevKernel_AllReduce_Sum_bf16") == "communication"
    assert categorise("_row_stats_kernel_grpo") == "loss"
    assert categorise("vectorized_elementwise_kernel<4, mul>") == "elementwise"
    assert categorise("some_custom_kernel") == "other"
    entries = [kernel("sm90_xmma_gemm", 300.0), kernel("nvjet_tst", 100.0), kernel("flash_fwd", 50.0),
               {"name": "aten::mm", "kernel": False, "device_us": 400.0, "cpu_us": 10.0, "calls": 2}]
    assert time_categories(entries) == pytest.approx({"gemm": 400e-6, "attention": 50e-6})


def test_a_blocking_copy_is_one_wait_not_two():
    # .item() twice: each a device-to-host copy that the host waits on with a stream synchronisation
    items = [kernel("Memcpy DtoH (Device -> Pageable)", 2.0, calls=2), host("cudaMemcpyAsync", 2),
             host("cudaStreamSynchronize", 2)]
    assert host_syncs(items) == 2
    # plus an explicit stream.synchronize(), a torch.cuda.synchronize() and an event wait
    assert host_syncs(items + [host("cudaStreamSynchronize", 1)]) == 3
    assert host_syncs(items + [host("cudaDeviceSynchronize"), host("cudaEventSynchronize")]) == 4
    # a non-blocking copy into pinned memory has no synchronisation of its own; it still counts
    assert host_syncs([kernel("Memcpy DtoH (Device -> Pinned)", 1.0)]) == 1
    # host-to-device copies and launches are not waits
    assert host_syncs([kernel("Memcpy HtoD (Pageable -> Device)"), host("cudaLaunchKernel", 40)]) == 0


def test_only_the_chosen_step_is_profiled_and_its_file_lists_the_operators(tmp_path):
    profiler = StepProfiler(step=2, out_dir=tmp_path, enabled=True)
    a, b = torch.randn(64, 64), torch.randn(64, 64)
    for step in (1, 2, 3):
        with profiler(step):
            (a @ b).relu().sum().item()
    assert [p.name for p in tmp_path.iterdir()] == ["step_2.json"]
    entries = json.loads((tmp_path / "step_2.json").read_text())
    names = {e["name"] for e in entries}
    assert {"aten::mm", "aten::relu", "aten::sum"} <= names
    assert all(set(e) == {"name", "kernel", "device_us", "cpu_us", "calls"} for e in entries)
    assert not any(e["kernel"] for e in entries)  # CPU only: no device kernels
    assert host_syncs(entries) == 0
    off = StepProfiler(step=2, out_dir=tmp_path / "off", enabled=False)
    with off(2):
        pass
    assert not (tmp_path / "off").exists()
