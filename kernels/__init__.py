"""Triton kernels of the RL hot path, installed as ``megatron_vr1.kernels``.

    from megatron_vr1.kernels import group_advantages, token_logprobs, grpo_loss
"""

from .functional import group_advantages, grpo_loss, token_logprobs
from .packed import aggregate_loss, shift_labels

__all__ = ["aggregate_loss", "group_advantages", "grpo_loss", "shift_labels", "token_logprobs"]
