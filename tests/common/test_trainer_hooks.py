"""The non-public Trainer methods the project overrides: still there, still called, still of the same shape.

`ResumableTrainer` (common/checkpoints.py) overrides two private methods of transformers' Trainer. Private
methods change without notice between versions; the overrides accept whatever the base passes
(`*args, **kwargs`), and these tests fail naming the method when an upgrade stops calling one or changes
what it is given, so the override is revisited instead of silently doing nothing.
"""

import inspect

import pytest
from transformers import Trainer

from common.checkpoints import ResumableTrainer
from common.trainer import FinetuningTrainer
from tests.common.regression_trainer import regression_trainer

# Each overridden private method and the parameters of the base method the override was checked against.
OVERRIDDEN = {
    "_save_checkpoint": ["self", "model", "trial"],
    "_run_epoch": [
        "self", "model", "epoch", "train_dataloader", "steps_in_epoch", "num_update_steps_per_epoch", "trial",
        "ignore_keys_for_eval", "start_time", "resume_from_checkpoint", "epochs_trained",
        "steps_trained_in_current_epoch",
    ],
}


def own_private_overrides(cls: type) -> set[str]:
    """Private (not dunder) methods that `cls` or its project bases define and transformers' Trainer has."""
    names = set()
    for klass in cls.__mro__:
        if klass.__module__.startswith("common."):
            names |= {name for name in vars(klass) if name.startswith("_") and not name.startswith("__")}
    return {name for name in names if hasattr(Trainer, name)}


def test_every_private_override_is_listed_here():
    assert own_private_overrides(FinetuningTrainer) <= set(OVERRIDDEN), (
        "a new override of a private Trainer method: add it to OVERRIDDEN with the base signature"
    )


@pytest.mark.parametrize("name", sorted(OVERRIDDEN))
def test_the_base_still_has_the_method_with_the_same_parameters(name):
    base = getattr(Trainer, name, None)
    assert base is not None, f"transformers.Trainer no longer has {name}: ResumableTrainer.{name} is never called"
    parameters = list(inspect.signature(base).parameters)
    assert parameters == OVERRIDDEN[name], (
        f"transformers.Trainer.{name} now takes {parameters}, not {OVERRIDDEN[name]}: check ResumableTrainer.{name}"
    )


@pytest.mark.parametrize("name", sorted(OVERRIDDEN))
def test_the_override_accepts_what_the_base_passes(name):
    parameters = inspect.signature(getattr(ResumableTrainer, name)).parameters.values()
    kinds = {parameter.kind for parameter in parameters}
    assert {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD} <= kinds, (
        f"ResumableTrainer.{name} must accept *args and **kwargs"
    )


def test_training_calls_every_override(tmp_path, monkeypatch):
    calls = []
    for name in OVERRIDDEN:
        override = getattr(ResumableTrainer, name)

        def recording(self, *args, _name=name, _override=override, **kwargs):
            calls.append(_name)
            return _override(self, *args, **kwargs)

        monkeypatch.setattr(ResumableTrainer, name, recording)
    regression_trainer(tmp_path, max_steps=2, save_steps=1).train()
    for name in OVERRIDDEN:
        assert name in calls, f"transformers.Trainer no longer calls {name} while training: ResumableTrainer.{name} is dead"
