"""The training-curve picture every run leaves in its output folder: loss and learning rate per step, and the
task metric at each evaluation during training (--eval_steps, --eval_every_epoch) when there were any."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on training nodes
import matplotlib.pyplot as plt  # noqa: E402

# Trainer log keys of an evaluation that are not a task metric
_NOT_METRICS = {"eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "eval_loss"}


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
    steps = [entry["step"] for entry in logged]
    figure, axes = plt.subplots(1, 2 + bool(metrics), figsize=(5 * (2 + bool(metrics)), 4))
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
    for axis in axes:
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
