"""GRPO under Progressive Thinking Suppression Training: reward, rollout engines, the RL step."""
