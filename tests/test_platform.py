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
