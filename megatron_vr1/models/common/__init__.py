"""Building blocks shared by the project's Megatron-Core models."""
