"""What a run trains for and how it is scored: the part of a run that differs between supervised finetuning
(the recipe's: answers learnt token by token, scored by generating) and preference tuning (common/preference:
DPO on pairs, scored by rewards). common/finetune.py orders the phases and calls its task's objective for
these steps:

    preview(config, train, evaluation, distributed)        --preview_samples
    run_report(output_dir, identity, metric, evaluation, distributed) -> evaluation.html's writer (common/report)
    start(config, processor, model, train, evaluation, distributed) -> the objective of this run,
                                                            once the model is loaded (a preference run's reference)
    evaluate(model, processor, dataset, metric, path, evaluation, distributed) -> report   before / after training
    during_training(processor, dataset, metric, evaluation, precision, distributed) -> model -> {"eval_...": ...}
    make_trainer(model, processor, train_args, dataset, training, **trainer options) -> the run's Trainer
"""

from __future__ import annotations

from .evaluation import evaluate
from .packing import train_collator
from .preview import run_preview
from .report.run import RunReport
from .trainer import make_trainer
from .training_evaluation import TaskEvaluation


class Supervised:
    """The recipe's objective: every task's unless it names another."""

    preview = staticmethod(run_preview)
    evaluate = staticmethod(evaluate)
    during_training = TaskEvaluation
    run_report = RunReport

    def start(self, config, processor, model, train, evaluation, distributed) -> Supervised:
        return self

    @staticmethod
    def make_trainer(model, processor, train_args, dataset, training, **options):
        return make_trainer(model, processor, train_args, dataset, train_collator(processor, training), **options)


SUPERVISED = Supervised()
