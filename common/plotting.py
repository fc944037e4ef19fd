"""The training-curve picture every run leaves in its output folder: loss and learning rate per step."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on training nodes
import matplotlib.pyplot as plt  # noqa: E402


def plot_training_curves(log_history: list[dict], path: Path) -> Path | None:
    """Write loss and learning rate from the Trainer's `state.log_history`; None when nothing was logged."""
    logged = [entry for entry in log_history if "loss" in entry and "step" in entry]
    if not logged:
        return None
    steps = [entry["step"] for entry in logged]
    figure, (loss_axis, lr_axis) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axis.plot(steps, [entry["loss"] for entry in logged], marker=".")
    loss_axis.set(title="training loss", xlabel="optimizer step", ylabel="loss")
    lr_axis.plot(steps, [entry.get("learning_rate", float("nan")) for entry in logged], marker=".", color="tab:orange")
    lr_axis.set(title="learning rate", xlabel="optimizer step", ylabel="learning rate")
    for axis in (loss_axis, lr_axis):
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
