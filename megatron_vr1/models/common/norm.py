"""RMSNorm with Hugging Face's numerics, usable inside Megatron-Core specs: the plain torch one
(the ``local`` spec) and the Triton-fused one (the ``fused`` spec)."""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from ...kernels import reference
from ...kernels.functional import rms_norm


class RMSNorm(torch.nn.Module):
    """``weight * (x / rms(x))`` computed in fp32 and cast back before the weight, as Qwen does.

    Unlike megatron-core's ``WrappedTorchNorm`` it works with sequence parallelism: the weight is
    tagged so that its gradient is all-reduced over the tensor-parallel group.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, **_: object) -> None:
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reference.rms_norm(x, self.weight, self.eps)


class FusedRMSNorm(RMSNorm):
    """The same norm, parameters and checkpoint keys, through ``kernels.rms_norm``: one Triton
    launch forward and one backward on a GPU (``kernel_backend`` "auto"), the torch reference on
    CPU tensors; tests set ``kernel_backend = "triton"`` to run the kernels in the interpreter."""

    kernel_backend = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, backend=self.kernel_backend)
