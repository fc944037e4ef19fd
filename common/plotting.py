"""The training-curve picture every run leaves in its output folder: loss and learning rate per step, the
task metric at each evaluation during training (--eval_steps, --eval_every_epoch) when there were any, and for
a preference run (common/preference) the rewards of chosen and rejected answers and their margin, as trained
and at each evaluation."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on training nodes
import matplotlib.pyplot as plt  # noqa: E402

REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/margins")  # logged by preference runs
# Trainer log keys of an evaluation that are not a task metric (rewards have their own panel)
_NOT_METRICS = {"eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "eval_loss",
                "eval_logps/chosen", "eval_logps/rejected", *(f"eval_{name}" for name in REWARDS)}


def evaluation_keys(log_history: list[dict]) -> list[str]:
    """The `eval_<metric>` keys logged during training, in order of appearance."""
    keys = []
    for entry in log_history:
        keys += [key for key in entry if key.startswith("eval_") and key not in _NOT_METRICS and key not in keys]
    return keys


def plot_training_curves(log_history: list[dict], path: Path) -> Path | None:
    """Write loss and learning rate (and the task metric) from the Trainer's `state.log_history`; None when
    nothing was logged."""
    logged = [entry for entry in log_history if "loss" in entry and "step" in entry]
    if not logged:
        return None
    metrics = evaluation_keys(log_history)
    rewards = any(REWARDS[0] in entry for entry in logged)
    steps = [entry["step"] for entry in logged]
    panels = 2 + bool(metrics) + rewards
    figure, axes = plt.subplots(1, panels, figsize=(5 * panels, 4))
    loss_axis, lr_axis = axes[0], axes[1]
    loss_axis.plot(steps, [entry["loss"] for entry in logged], marker=".")
    loss_axis.set(title="training loss", xlabel="optimizer step", ylabel="loss")
    lr_axis.plot(steps, [entry.get("learning_rate", float("nan")) for entry in logged], marker=".", color="tab:orange")
    lr_axis.set(title="learning rate", xlabel="optimizer step", ylabel="learning rate")
    if metrics:
        metric_axis = axes[2]
        for key in metrics:
            points = [(entry["step"], entry[key]) for entry in log_history if key in entry]
            metric_axis.plot(*zip(*points, strict=True), marker="o", label=key.removeprefix("eval_"))
        metric_axis.set(title="task metric (evaluation)", xlabel="optimizer step", ylabel="score")
        metric_axis.legend()
    if rewards:
        _plot_rewards(axes[-1], log_history)
    for axis in axes:
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _plot_rewards(axis, log_history: list[dict]) -> None:
    """Each reward as trained (a line, the mean since the previous log) and at each evaluation (points)."""
    for name, colour in zip(REWARDS, ("tab:green", "tab:red", "tab:blue"), strict=True):
        for key, style in ((name, {"marker": "."}), (f"eval_{name}", {"marker": "o", "linestyle": "--"})):
            points = [(entry["step"], entry[key]) for entry in log_history if key in entry and "step" in entry]
            if points:
                label = name.removeprefix("rewards/") + (" (evaluation)" if key != name else "")
                axis.plot(*zip(*points, strict=True), color=colour, label=label, **style)
    axis.axhline(0, color="grey", linewidth=0.8)
    axis.set(title="rewards", xlabel="optimizer step", ylabel="beta x log-ratio to the reference")
    axis.legend()
