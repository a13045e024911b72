"""Triton kernels of the RL hot path, installed as ``megatron_vr1.kernels``.

    from megatron_vr1.kernels import group_advantages, token_logprobs, grpo_loss
"""

if __name__ == "megatron_vr1.kernels":
    from .functional import group_advantages, grpo_loss, token_entropy, token_logprobs
    from .packed import IGNORE_INDEX, LossSum, aggregate_loss, shift_labels

    __all__ = ["IGNORE_INDEX", "LossSum", "aggregate_loss", "group_advantages", "grpo_loss", "shift_labels",
               "token_entropy", "token_logprobs"]
else:
    # Imported as a bare top-level ``kernels`` because the checkout's root is on sys.path (``python
    # -m`` from there): transformers probes for Hugging Face's package of that name and imports
    # whatever it finds. Answer as an unusable version of it instead of loading the project twice.
    __version__ = "0"
