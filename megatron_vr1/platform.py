"""The one place that knows whether we run on CUDA or on CPU.

On a CUDA machine nothing here changes megatron-core. On a machine without CUDA,
:func:`use_cpu_backend` makes megatron-core's CUDA-only calls run on the CPU with gloo:

* ``torch.cuda.current_device()`` answers ``"cpu"`` and ``synchronize()`` does nothing;
* the model-parallel RNG tracker keeps CPU generator states instead of CUDA ones;
* tensors created with ``device="cuda"`` (or an int device) and ``.cuda()`` calls land on
  the CPU, and ``Tensor.type()`` names the CUDA type a tensor stands in for, through a
  :class:`torch.overrides.TorchFunctionMode`, so that megatron-core's own source stays
  untouched. (Modes are off inside autograd backward functions; megatron-core's backward code
  only uses ``current_device()``, covered above.)
  Torch function modes are per thread: every thread started after :func:`use_cpu_backend`
  (data loading, rollout, async saves) enters its own copy of the mode.

* ``torch.cuda.Event`` (megatron-core's generation loop times each step with it) is a host
  clock; megatron-core's paged (dynamic) inference attention gets flash-attn's paged entry
  points in torch (:mod:`megatron_vr1.models.common.paged_attention`), and :func:`refit_copy_service` gives megatron-core's weight refit a gloo transport
  without the CUDA stream its own gloo service creates.

It also chooses what differs by platform without a CPU branch anywhere else: the fusions
megatron-core may use (:func:`fusion_config`) and how inputs are validated in the hot path
(:func:`check`: a named error on the host, an asynchronous device assertion on a GPU).

No other module of the project may special-case the CPU.
"""

from __future__ import annotations

import os
import threading
import time
from datetime import timedelta
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_lock = threading.Lock()
_cpu_mode: TorchFunctionMode | None = None


def has_cuda() -> bool:
    """True when this process should use CUDA devices."""
    return torch.cuda.is_available()


def device() -> torch.device:
    """The device this rank computes on."""
    return torch.device("cuda", torch.cuda.current_device()) if has_cuda() else torch.device("cpu")


def dist_backend() -> str:
    return "nccl" if has_cuda() else "gloo"


def _is_cuda_device(dev: Any) -> bool:
    if isinstance(dev, bool):
        return False
    if isinstance(dev, int):
        return True
    if isinstance(dev, str):
        return dev.startswith("cuda")
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Maps any CUDA device argument of a torch call to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dev = kwargs.get("device")
        if dev is not None and _is_cuda_device(dev):
            kwargs = dict(kwargs, device="cpu")
        if func is torch.Tensor.cuda:
            return args[0]

        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # megatron-core's optimizers check a parameter's kind by this string
            # ("torch.cuda.FloatTensor", ...): answer as the CUDA tensor it stands in for
            return func(*args).replace("torch.", "torch.cuda.", 1)
        return func(*args, **kwargs)


_thread_start = threading.Thread._bootstrap_inner  # type: ignore[attr-defined]


def _bootstrap_inner_with_cpu_mode(self) -> None:
    """``Thread._bootstrap_inner`` of every thread started once the CPU backend is on: the
    CUDA-to-CPU mode is entered before the thread's ``run`` (modes live on a per-thread stack)."""
    with _CudaToCpuMode():
        _thread_start(self)


class _HostEvent:
    """``torch.cuda.Event`` on the host: records a clock reading; times in milliseconds."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False) -> None:
        self._t: float | None = None

    def record(self, stream: Any = None) -> None:
        self._t = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def wait(self, stream: Any = None) -> None:
        pass

    def elapsed_time(self, end: "_HostEvent") -> float:
        if self._t is None or end._t is None:
            raise RuntimeError("elapsed_time needs both events recorded")
        return (end._t - self._t) * 1e3


def _cpu_get_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False):
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False):
    torch.set_rng_state(new_state)


def use_cpu_backend() -> None:
    """Make megatron-core run on the CPU. Idempotent; a no-op on CUDA machines."""
    global _cpu_mode
    if has_cuda():
        return
    with _lock:
        if _cpu_mode is not None:
            return
        from megatron.core.tensor_parallel import random as mc_random

        # "cpu", not an ordinal: megatron-core passes it as ``device=`` also inside autograd
        # backward functions, where torch function modes are switched off.
        torch.cuda.current_device = lambda: "cpu"
        torch.cuda.synchronize = lambda device=None: None
        torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
        torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
        # The "CUDA" generator is the CPU one: seeding it seeds the CPU, and the tracker's
        # saved states are CPU generator states.
        torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
        torch.cuda.manual_seed_all = lambda seed: None
        torch.cuda.Event = _HostEvent  # megatron-core's static generation loop times its steps
        mc_random._get_cuda_rng_state = _cpu_get_rng_state
        mc_random._set_cuda_rng_state = _cpu_set_rng_state
        _install_paged_attention()
        _cpu_mode = _CudaToCpuMode()
        _cpu_mode.__enter__()
        threading.Thread._bootstrap_inner = _bootstrap_inner_with_cpu_mode  # type: ignore[attr-defined]


def _install_paged_attention() -> None:
    """megatron-core's dynamic (paged KV cache) inference on the CPU: flash-attn's paged entry
    points in plain torch, and the KV append in torch instead of its Triton kernel."""
    from megatron.core.inference.contexts import dynamic_context
    from megatron.core.transformer import attention

    from .models.common.paged_attention import kvcache_paged_attention, varlen_paged_attention

    attention.flash_attn_varlen_func = varlen_paged_attention
    attention.flash_attn_with_kvcache = kvcache_paged_attention
    attention.is_fa_min_version = lambda version, *a, **k: True  # the two above take flash-attn 2's arguments
    dynamic_context.triton_append_key_value_cache = None


def refit_copy_service():
    """The transport for megatron-core's weight refit (``megatron.core.resharding``): NCCL on
    CUDA; on the CPU its gloo service, built without the CUDA stream it would otherwise create."""
    if has_cuda():
        return "nccl"
    from megatron.core.resharding.copy_services.gloo_copy_service import GlooCopyService

    class HostGlooCopyService(GlooCopyService):
        def __init__(self) -> None:
            stream, torch.cuda.Stream = torch.cuda.Stream, lambda *a, **k: None
            try:
                super().__init__()
            finally:
                torch.cuda.Stream = stream

    return HostGlooCopyService()


def init_distributed(
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    *,
    seed: int = 1234,
    timeout_minutes: int = 10,
    **model_parallel_kwargs: Any,
) -> None:
    """Start torch.distributed from torchrun's environment and megatron-core's parallel state.

    Works without torchrun too (a single process, world size 1).
    """
    from megatron.core import parallel_state, tensor_parallel as mc_tp

    use_cpu_backend()
    if not torch.distributed.is_initialized():
        if "WORLD_SIZE" in os.environ:  # launched by torchrun (or a compatible launcher)
            rank, world, init_method = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), "env://"
        else:  # a lone process: a private rendezvous, leaving the environment to child processes
            rank, world, init_method = 0, 1, f"tcp://127.0.0.1:{_free_port()}"
        if has_cuda():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group(
            backend=dist_backend(),
            init_method=init_method,
            rank=rank,
            world_size=world,
            timeout=timedelta(minutes=timeout_minutes),
        )
    world = torch.distributed.get_world_size()
    context_parallel = int(model_parallel_kwargs.get("context_parallel_size", 1))
    replica = tensor_parallel * context_parallel * pipeline_parallel
    if world % replica:
        from .errors import UsageError

        raise UsageError(
            f"world size {world} is not divisible by tensor_parallel ({tensor_parallel}) x context_parallel "
            f"({context_parallel}) x pipeline_parallel ({pipeline_parallel}): launch a multiple of {replica} "
            f"processes or change model.parallel"
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        **model_parallel_kwargs,
    )
    mc_tp.model_parallel_cuda_manual_seed(seed)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shutdown_distributed() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def fusion_config(backend: str, *, gradient_accumulation: bool = False) -> dict[str, bool]:
    """megatron-core fusion switches for this platform and layer backend (``local`` or ``te``).

    On CUDA the jit-fused SwiGLU and bias-dropout-add are on. Fusing the weight-gradient
    accumulation into the GEMM needs Transformer Engine's linear layers (the local ones would
    need Apex) and ``main_grad`` buffers, which only megatron-core's DDP wrapper provides: the
    trainer asks for it with ``gradient_accumulation``. RoPE fusion stays off everywhere: TE's
    fused THD kernel indexes one frequency row per position within a sequence, but M-RoPE needs
    one per token (3-D positions). Softmax and layer-norm fusions belong to modules we do not use.
    """
    cuda = has_cuda()
    return dict(
        bias_activation_fusion=cuda,
        bias_dropout_fusion=cuda,
        gradient_accumulation_fusion=cuda and backend == "te" and gradient_accumulation,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
    )


def check(condition: torch.Tensor, message: str, error: type[Exception] = ValueError) -> None:
    """Validate a tensor condition without a host sync in the GPU hot path.

    On the host the condition is read at once and a failure raises ``error(message)``; on a GPU
    it becomes :func:`torch._assert_async`, which never waits for the device (a failure surfaces
    as a device-side assertion carrying ``message`` at the next synchronisation).
    """
    if condition.device.type == "cpu":
        if not bool(condition.all()):
            raise error(message)
    else:
        torch._assert_async(condition.all(), message)


# Dense bf16 tensor-core peak (no sparsity) by device name, for MFU.
_PEAK_BF16_FLOPS = {"H200": 989.4e12, "H100 SXM": 989.4e12, "H100 80GB HBM3": 989.4e12, "H100 NVL": 835.5e12,
                    "H100 PCIe": 756.5e12, "H100": 989.4e12, "A100": 312e12, "L40S": 362.1e12}


def peak_flops() -> float | None:
    """This device's dense bf16 peak in FLOP/s, or None where unknown (CPU, unlisted GPUs)."""
    if not has_cuda():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in _PEAK_BF16_FLOPS.items() if k in name), None)


def device_memory_bytes() -> int | None:
    """Memory of this process's accelerator, or None on the CPU (no budget to plan against)."""
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory if has_cuda() else None


def memory_peak_gb() -> float | None:
    """The most memory this process's tensors have held on the device since it started (GiB,
    what the planner estimates), or None on the CPU."""
    return torch.cuda.max_memory_allocated() / 2**30 if has_cuda() else None


def synchronize() -> None:
    """Wait for the device (for timings); nothing to wait for on the CPU."""
    if has_cuda():
        torch.cuda.synchronize()


def has_transformer_engine() -> bool:
    """Transformer Engine is a GPU extra: only probed where CUDA is present."""
    if not has_cuda():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True
