"""Training components shared by the SFT and RL trainers: optimizer and schedule, the step over
megatron-core's pipeline schedules, checkpoints, metrics, graceful stopping, FLOPs."""
