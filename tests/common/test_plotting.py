"""common/plotting.py: the training-curve PNG from the Trainer's log_history."""

import matplotlib.pyplot as plt
import pytest
from PIL import Image

import common.plotting as plotting_module
from common.plotting import plot_training_curves

LOG_HISTORY = [
    {"loss": 2.5, "learning_rate": 1e-5, "grad_norm": 3.0, "epoch": 0.1, "step": 10},
    {"loss": 1.75, "learning_rate": 4e-5, "grad_norm": 2.0, "epoch": 0.2, "step": 20},
    {"eval_loss": 1.9, "epoch": 0.2, "step": 20},  # not a training log: ignored
    {"loss": 1.25, "learning_rate": 2e-5, "grad_norm": 1.0, "epoch": 0.3, "step": 30},
    {"train_runtime": 12.0, "train_loss": 1.8, "epoch": 1.0, "step": 30},  # the final summary: ignored
]


@pytest.fixture
def figures(monkeypatch) -> list:
    """The figures the plotting draws, in order."""
    drawn = []
    real_subplots = plt.subplots

    def recording_subplots(*args, **kwargs):
        figure, axes = real_subplots(*args, **kwargs)
        drawn.append(figure)
        return figure, axes

    monkeypatch.setattr(plotting_module.plt, "subplots", recording_subplots)
    return drawn


def test_writes_a_png_of_loss_and_learning_rate(tmp_path, figures):
    path = tmp_path / "training_curves.png"
    assert plot_training_curves(LOG_HISTORY, path) == path

    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == (1000, 400)  # figsize (10, 4) at dpi 100
    (figure,) = figures
    loss_axis, lr_axis = figure.axes
    assert len(figure.axes) == 2
    assert loss_axis.get_title() == "training loss" and lr_axis.get_title() == "learning rate"
    (loss_line,) = loss_axis.get_lines()
    assert list(loss_line.get_xdata()) == [10, 20, 30]
    assert list(loss_line.get_ydata()) == [2.5, 1.75, 1.25]
    (lr_line,) = lr_axis.get_lines()
    assert list(lr_line.get_ydata()) == pytest.approx([1e-5, 4e-5, 2e-5])
    assert not plt.fignum_exists(figure.number)  # closed: long runs do not leak figures


def test_missing_learning_rate_is_plotted_as_a_gap(tmp_path):
    path = plot_training_curves([{"loss": 1.0, "step": 1}, {"loss": 0.5, "step": 2}], tmp_path / "c.png")
    assert path.is_file() and path.stat().st_size > 0


@pytest.mark.parametrize(
    "history",
    [
        [],
        [{"eval_loss": 1.0, "step": 5}, {"train_runtime": 3.0, "train_loss": 1.2, "step": 5}],
        [{"loss": 1.0}],  # no step
    ],
)
def test_nothing_logged_returns_none_and_writes_nothing(tmp_path, history):
    path = tmp_path / "training_curves.png"
    assert plot_training_curves(history, path) is None
    assert not path.exists()


def test_the_task_metric_logged_during_training_gets_its_own_panel(tmp_path, monkeypatch):
    figures = []
    real_subplots = plt.subplots
    monkeypatch.setattr(plotting_module.plt, "subplots",
                        lambda *a, **k: figures.append(real_subplots(*a, **k)[0]) or (figures[-1], figures[-1].axes))
    history = [*LOG_HISTORY[:2], {"eval_anls": 0.25, "epoch": 0.2, "step": 20}, LOG_HISTORY[3],
               {"eval_anls": 0.5, "epoch": 0.3, "step": 30}]
    path = plot_training_curves(history, tmp_path / "training_curves.png")
    with Image.open(path) as image:
        assert image.size == (1500, 400)
    (figure,) = figures
    metric_axis = figure.axes[2]
    assert metric_axis.get_title() == "task metric (evaluation)"
    (line,) = metric_axis.get_lines()
    assert list(line.get_xdata()) == [20, 30] and list(line.get_ydata()) == [0.25, 0.5]
    assert line.get_label() == "anls"


def test_a_preference_run_gets_a_rewards_panel(tmp_path, figures):
    rewards = {"rewards/chosen": 0.0, "rewards/rejected": 0.0, "rewards/margins": 0.0, "rewards/accuracies": 0.0,
               "logps/chosen": -30.0, "logps/rejected": -31.0}
    history = [
        {"loss": 0.69, "learning_rate": 1e-6, **rewards, "step": 1},
        {"loss": 0.5, "learning_rate": 1e-6, **rewards, "rewards/chosen": 0.4, "rewards/margins": 0.6, "step": 2},
        {**{f"eval_{name}": value for name, value in rewards.items()}, "eval_rewards/accuracies": 0.75,
         "eval_loss": 0.6, "step": 2},
    ]
    plot_training_curves(history, tmp_path / "c.png")
    (figure,) = figures
    titles = [axis.get_title() for axis in figure.axes]
    assert titles == ["training loss", "learning rate", "task metric (evaluation)", "rewards"]
    (accuracy,) = figure.axes[2].get_lines()  # the headline only: rewards and log-probs are not task metrics
    assert list(accuracy.get_ydata()) == [0.75]
    labels = [line.get_label() for line in figure.axes[3].get_lines()]
    assert labels[:6] == ["chosen", "chosen (evaluation)", "rejected", "rejected (evaluation)", "margins",
                          "margins (evaluation)"]
    assert list(figure.axes[3].get_lines()[0].get_ydata()) == [0.0, 0.4]
