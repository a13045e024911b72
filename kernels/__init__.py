"""Triton kernels of the RL hot path, installed as ``megatron_vr1.kernels``.

    from megatron_vr1.kernels import group_advantages, token_logprobs, grpo_loss
"""

if __name__ == "megatron_vr1.kernels":
    from .functional import group_advantages, grpo_loss, rms_norm, rotary, token_entropy, token_logprobs
    from .packed import IGNORE_INDEX, LossSum, aggregate_loss, shift_labels

    __all__ = ["IGNORE_INDEX", "LossSum", "aggregate_loss", "group_advantages", "grpo_loss", "rms_norm", "rotary",
               "shift_labels", "token_entropy", "token_logprobs"]
else:
    # Imported as a bare top-level ``kernels`` because the checkout's root is on sys.path (``python
    # -m`` from there). That name belongs to Hugging Face's package, which transformers imports:
    # hand over to it where it is installed (found on sys.path without the checkout's root), else
    # answer as an unusable version of it; never load the project a second time.
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _spec = _machinery.PathFinder.find_spec(
        "kernels", [p for p in _sys.path if _os.path.abspath(p or _os.getcwd()) != _root])
    if _spec is None:
        __version__ = "0"
    else:
        _module = _util.module_from_spec(_spec)
        _sys.modules["kernels"] = _module  # what `import kernels` returns from here on
        _spec.loader.exec_module(_module)
