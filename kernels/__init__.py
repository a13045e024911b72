"""Triton kernels of the RL hot path, installed as ``megatron_vr1.kernels``."""
