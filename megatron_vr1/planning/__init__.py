"""Memory planning before a job is booked: parameters, gradients, optimizer state, activations,
reference and rollout memory per rank, for any layout, and a search for layouts that fit."""

from .activations import ActivationSettings, stage_bytes
from .counts import RankParams, rank_params, stage_layers
from .memory import GiB, Plan, PlanSettings, RolloutSettings, plan, rollout_rows, search
from .report import dry_run, format_plan, settings_from_conf

__all__ = ["ActivationSettings", "GiB", "Plan", "PlanSettings", "RankParams", "RolloutSettings", "dry_run",
           "format_plan", "plan", "rank_params", "rollout_rows", "search", "settings_from_conf",
           "stage_bytes", "stage_layers"]
