"""megatron-vr1: Vision-R1 (cold-start SFT + GRPO with PTST) for Qwen2.5-VL on Megatron-Core."""

__version__ = "0.1.0"
