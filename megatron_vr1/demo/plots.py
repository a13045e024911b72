"""PNG plots of a run's ``metrics.jsonl``: the SFT loss, and GRPO's reward (with its running mean
beside the shuffled-reward control's), accuracy and response length per step with the PTST stage
boundaries marked.

Each PNG carries the points it draws in a text chunk (``plotted``: every line's x and y, and the
stage boundaries), read back with ``read_plotted``: what a check of the plot compares with the
metrics.
"""

from __future__ import annotations

import json
from pathlib import Path

PLOTTED = "plotted"


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _figure(rows: int, title: str):
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, 1, figsize=(7, 2.4 * rows + 0.6), sharex=True, squeeze=False)
    fig.suptitle(title)
    return fig, [a[0] for a in axes]


def _save(fig, path: Path, boundaries: list[float]) -> Path:
    import matplotlib.pyplot as plt

    plotted = {"lines": {}, "stage_boundaries": boundaries}
    for ax in fig.axes:
        for line in ax.get_lines():
            if not line.get_label().startswith("_"):
                plotted["lines"][f"{ax.get_ylabel()}/{line.get_label()}"] = {
                    "x": [float(v) for v in line.get_xdata()], "y": [float(v) for v in line.get_ydata()]}
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={PLOTTED: json.dumps(plotted)})
    plt.close(fig)
    return path


def read_plotted(path: str | Path) -> dict:
    """The points a plot drew (from its PNG text chunk)."""
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        return json.loads(img.text[PLOTTED])


def plot_sft(metrics: list[dict], path: str | Path) -> Path:
    fig, (ax,) = _figure(1, "Cold-start SFT")
    steps = [m["step"] for m in metrics]
    ax.plot(steps, [m["loss"] for m in metrics], marker=".", label="loss")
    ax.set_yscale("log")
    ax.set_ylabel("loss")
    ax.set_xlabel("optimizer step")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, Path(path), [])


def stage_boundaries(metrics: list[dict]) -> list[float]:
    """Half-way between the last step of a stage and the first of the next."""
    return [(a["step"] + b["step"]) / 2 for a, b in zip(metrics, metrics[1:]) if a["stage"] != b["stage"]]


RUNNING = 5  # steps in the running mean of the reward


def running_mean(values: list[float], window: int = RUNNING) -> list[float]:
    """Mean of the last ``window`` values at each point (fewer at the start)."""
    return [sum(values[max(0, i + 1 - window):i + 1]) / (i + 1 - max(0, i + 1 - window)) for i in range(len(values))]


def plot_rl(metrics: list[dict], path: str | Path, control: list[dict] | None = None) -> Path:
    """GRPO's curves; ``control``: the shuffled-reward run's metrics, whose running mean reward is
    drawn beside the run's own."""
    fig, axes = _figure(3, "GRPO with PTST")
    steps = [m["step"] for m in metrics]
    panels = [("reward", [("reward_mean", "mean reward"), ("format_rate", "format right")]),
              ("accuracy", [("accuracy", "answer right")]),
              ("response tokens", [("response_length_mean", "mean length"), ("max_response_tokens", "stage budget")])]
    for ax, (ylabel, series) in zip(axes, panels):
        for key, label in series:
            style = {"drawstyle": "steps-mid", "linestyle": "--"} if key == "max_response_tokens" else {"marker": "."}
            ax.plot(steps, [m[key] for m in metrics], label=label, **style)
        if ylabel == "reward":
            runs = [("GRPO", metrics, "tab:green")] + ([("control", control, "tab:red")] if control else [])
            for name, ms, colour in runs:
                ax.plot([m["step"] for m in ms], running_mean([m["reward_mean"] for m in ms]), color=colour,
                        linewidth=2.2, label=f"{name}, running mean ({RUNNING} steps)")
        ax.set_ylabel(ylabel)
        if ylabel != "response tokens":
            ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize="small")
    boundaries = stage_boundaries(metrics)
    for x in boundaries:
        after = next(m for m in metrics if m["step"] > x)
        for ax in axes:
            ax.axvline(x, color="grey", linestyle=":")
        axes[0].annotate(f"stage {after['stage']}: {after['max_response_tokens']} tokens x {after['group_size']}",
                         (x, 0.0), xycoords=("data", "axes fraction"), xytext=(3, 4), textcoords="offset points",
                         fontsize="small", color="grey")
    axes[-1].set_xlabel("RL step")
    return _save(fig, Path(path), boundaries)
