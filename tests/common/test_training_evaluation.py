"""common/training_evaluation.py: when evaluations run, what a score does (best, --keep_best, early stopping),
and the export of the best checkpoint's model."""


import pytest
from transformers import TrainerControl, TrainerState, TrainingArguments

from common.config import TrainingEvaluationConfig
from common.data import Sample, SampleDataset, Turn
from common.metrics import ACCURACY
from common.training_evaluation import BestCheckpointCallback, during_training_subset


def callback(**config) -> BestCheckpointCallback:
    return BestCheckpointCallback(TrainingEvaluationConfig(**config), ACCURACY, num_samples=4)


@pytest.fixture
def args(tmp_path):
    return TrainingArguments(output_dir=str(tmp_path), report_to="none")


def evaluate(watch, args, state, step, score) -> TrainerControl:
    """What the Trainer does at an evaluation: log the score at its step, then call on_evaluate."""
    state.global_step = step
    state.log_history.append({"eval_accuracy": score, "step": step})
    control = TrainerControl()
    watch.on_evaluate(args, state, control, metrics={"eval_accuracy": score})
    return control


def test_evaluations_are_asked_for_every_n_steps_and_at_epoch_ends(args):
    watch, state = callback(eval_steps=3, every_epoch=True), TrainerState()
    evaluated = []
    for step in range(1, 9):
        state.global_step = step
        for event in ["on_step_end"] + (["on_epoch_end"] if step % 4 == 0 else []):  # epochs of 4 steps
            control = TrainerControl()
            getattr(watch, event)(args, state, control)
            if control.should_evaluate:  # the Trainer evaluates and logs the score at this step
                evaluated.append(step)
                state.log_history.append({"eval_accuracy": 0.5, "step": step})
    assert evaluated == [3, 4, 6, 8]


def test_an_epoch_end_after_an_evaluated_step_is_not_evaluated_again(args):
    watch, state = callback(eval_steps=4, every_epoch=True), TrainerState(global_step=4)
    state.log_history.append({"eval_accuracy": 0.5, "step": 4})
    control = TrainerControl()
    watch.on_epoch_end(args, state, control)
    assert not control.should_evaluate


def test_the_best_score_and_step_are_kept_in_the_trainer_state(args):
    watch, state = callback(eval_steps=1), TrainerState()
    for step, score in ((1, 0.25), (2, 0.75), (3, 0.5), (4, 0.75)):
        control = evaluate(watch, args, state, step, score)
        assert not control.should_save and not control.should_training_stop  # no --keep_best, no patience
    assert (state.best_metric, state.best_global_step) == (0.75, 2)  # a tie is no improvement
    assert state.best_model_checkpoint is None


def test_keep_best_saves_each_new_best_step(args, tmp_path):
    watch, state = callback(eval_steps=1, keep_best=True), TrainerState()
    saved = [step for step, score in ((1, 0.0), (2, 0.5), (3, 0.25), (4, 0.75))
             if evaluate(watch, args, state, step, score).should_save]
    assert saved == [1, 2, 4]
    assert state.best_model_checkpoint == str(tmp_path / "checkpoint-4")


def test_early_stopping_counts_evaluations_since_the_best(args):
    watch, state = callback(eval_steps=1, early_stopping_patience=2), TrainerState()
    stops = [evaluate(watch, args, state, step, score).should_training_stop
             for step, score in ((1, 0.5), (2, 0.25), (3, 0.75), (4, 0.5), (5, 0.5))]
    assert stops == [False, False, False, False, True]


def test_early_stopping_continues_from_a_resumed_state(args):
    """A resumed run's state holds the best and the log history: the count continues."""
    state = TrainerState(best_metric=0.75, best_global_step=3,
                         log_history=[{"eval_accuracy": 0.75, "step": 3}, {"eval_accuracy": 0.5, "step": 4}])
    assert evaluate(callback(eval_steps=1, early_stopping_patience=2), args, state, 5, 0.5).should_training_stop


def dataset(count: int) -> SampleDataset:
    samples = [Sample(f"s{i}", [Turn("q", "a")]) for i in range(count)]
    return SampleDataset(samples, lambda sample, index, draws: sample)


@pytest.mark.parametrize("samples, size, expected", [(None, 5, 5), (None, 250, 200), (3, 5, 3), (9, 5, 5)])
def test_the_first_k_samples_are_evaluated(samples, size, expected):
    subset = during_training_subset(dataset(size), TrainingEvaluationConfig(eval_steps=1, samples=samples))
    assert [subset[i].id for i in range(len(subset))] == [f"s{i}" for i in range(expected)]
