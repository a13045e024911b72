import pytest
import torch

from megatron_vr1 import platform

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU backend; CUDA is present")


def test_cpu_backend_maps_cuda_devices_to_cpu():
    platform.use_cpu_backend()
    platform.use_cpu_backend()  # idempotent
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.ones(1, device=torch.cuda.current_device()).device.type == "cpu"
    assert torch.ones(1).cuda().device.type == "cpu"
    assert torch.ones(1).to("cuda").device.type == "cpu"
    torch.cuda.synchronize()  # a no-op instead of an error


def test_rng_tracker_forks_cpu_state():
    from megatron.core.tensor_parallel import random as mc_random

    platform.use_cpu_backend()
    tracker = mc_random.CudaRNGStatesTracker()
    tracker.add("test-state", 123)
    before = torch.get_rng_state()
    with tracker.fork("test-state"):
        a = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(123)
    assert torch.equal(a, torch.rand(3))


def test_gpu_extras_are_not_probed_without_cuda():
    assert platform.has_transformer_engine() is False
    assert platform.dist_backend() == "gloo"
    assert platform.device().type == "cpu"


def test_cpu_backend_holds_in_threads_started_later():
    """Rollout, data loading and async saves run in threads: the shim must hold there too."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    platform.use_cpu_backend()
    seen = []
    thread = threading.Thread(target=lambda: seen.append(torch.zeros(2, device="cuda").device.type))
    thread.start()
    thread.join()
    with ThreadPoolExecutor(2) as pool:
        seen += pool.map(lambda _: torch.ones(1).to("cuda").device.type, range(4))
    assert seen == ["cpu"] * 5


def test_fusions_follow_the_platform(monkeypatch):
    off = platform.fusion_config("local")
    assert not any(off.values())  # CPU: megatron-core's unfused paths
    monkeypatch.setattr(platform, "has_cuda", lambda: True)
    local, te = platform.fusion_config("local"), platform.fusion_config("te", gradient_accumulation=True)
    assert local["bias_activation_fusion"] and local["bias_dropout_fusion"]
    assert not local["gradient_accumulation_fusion"]  # the local linears would need Apex
    assert te["gradient_accumulation_fusion"] and not te["apply_rope_fusion"]  # TE's fused RoPE cannot do M-RoPE
    assert not platform.fusion_config("te")["gradient_accumulation_fusion"]  # only with DDP's main_grad


def test_check_names_the_failure_on_the_host():
    platform.check(torch.tensor([True, True]), "never raised")
    with pytest.raises(ValueError, match="labels out of range"):
        platform.check(torch.tensor([True, False]), "labels out of range")
