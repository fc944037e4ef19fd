"""The run's output directory as a record: which run it belongs to, which checkpoint a rerun resumes from, and
which evaluations it already holds.

`run.json` records the run's identity: every resolved setting that changes what is trained or evaluated
(`run_identity`). A rerun into the same directory resumes from its newest complete checkpoint only when the
identity matches, and reads back an evaluation before training that this same run already wrote; a checkpoint of
another run is refused, naming the settings that differ. An explicit --resume_from_checkpoint abandons the
checkpoints newer than it: they are set aside, so that nothing resumes from them by accident. After a user error
the directory keeps everything complete (checkpoints, the evaluation before training, the TensorBoard logs that show
a divergence); only half-written outputs of this run go.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path

from transformers.trainer import TRAINER_STATE_NAME

from .checkpoints import (
    check_complete,
    checkpoint_folders,
    checkpoint_step,
    newest_complete_checkpoint,
    why_incomplete,
)
from .config import RESUME_LATEST, OutputConfig, RunConfig
from .distributed import Distributed
from .errors import UserError
from .metrics import Metric

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
ABANDONED_PREFIX = "abandoned-"  # output_dir/abandoned-<time>/checkpoint-N: a branch an explicit resume left

# The resolved settings (RunConfig's fields, dotted) that do not change what is trained or evaluated. Everything
# else — a setting added later included — is part of the run's identity.
NOT_IDENTITY = frozenset({
    "outputs",  # where the run writes, how often it saves, how many checkpoints it keeps, which one it resumes
    "verbose",  # log lines
    "preview_samples",  # a preview stops before anything is trained
    "training.logging_steps",  # how often the loss is logged
    "training.report_to",  # where it is logged
    "training.show_progress",  # progress bars
    "training.dataloader_num_workers",  # how many processes read the data
    "evaluation.show_progress",
    "evaluation.dataloader_num_workers",
    # the same samples per optimizer step, each weighing the same, whatever the micro-batch (FinetuningTrainer.
    # get_batch_samples): a run restarted on other GPUs or after running out of memory may change it
    "training.batch_size_per_gpu",
    "training.gradient_checkpointing",  # recomputes the same activations: memory, not results
    "evaluation.batch_size",  # a generation batch answers as its samples alone (tests/common/test_phi3v_modeling.py)
})


def run_identity(task_name: str, config: RunConfig) -> dict:
    """{setting: value} of everything in `config` that changes what is trained or evaluated (not NOT_IDENTITY),
    with local paths resolved: what a checkpoint in output_dir must have been made by for an automatic resume."""
    identity = {"task": task_name}
    for field in dataclasses.fields(config):
        _flatten(field.name, getattr(config, field.name), identity)
    return identity


def run_summary(task_name: str, config: RunConfig) -> dict:
    """The run in four settings, as a person names it (the evaluation report's heading): task, model, strategy, data."""
    data_path = config.data.local_source
    return {
        "task": task_name,
        "model": config.model.name_or_path,
        "strategy": config.strategy.name,
        "data": str(Path(data_path).resolve()) if data_path else "hub",
    }


def _flatten(name: str, value, into: dict) -> None:
    if name in NOT_IDENTITY:
        return
    if dataclasses.is_dataclass(value):
        for field in dataclasses.fields(value):
            _flatten(f"{name}.{field.name}", getattr(value, field.name), into)
    elif value is None or isinstance(value, bool | int | float):
        into[name] = value
    elif isinstance(value, str):
        into[name] = str(Path(value).resolve()) if value and Path(value).exists() else value  # a local model or data path
    else:
        into[name] = str(value)  # dtypes, tuples


def identity_differences(recorded: dict, identity: dict) -> list[str]:
    """`setting old -> new` for each setting that differs."""
    return [f"{key} {recorded.get(key, '(absent)')} -> {identity.get(key, '(absent)')}"
            for key in sorted(recorded.keys() | identity.keys()) if recorded.get(key) != identity.get(key)]


def resolve_checkpoint(outputs: OutputConfig, identity: dict, distributed: Distributed) -> Path | None:
    """An explicit path, if it is a complete checkpoint (the checkpoints in output_dir newer than it are set
    aside: a branch this run abandons); else the newest complete checkpoint-* in output_dir if this same run made
    it (automatic resume), passing over (and naming) incomplete ones; else None. A checkpoint of another run is
    refused, with the settings that differ. Every rank calls it."""
    output_dir = Path(outputs.output_dir)
    if outputs.resume_from_checkpoint not in (None, RESUME_LATEST):
        checkpoint = check_complete(Path(outputs.resume_from_checkpoint))
        if distributed.is_main:
            set_aside_abandoned_checkpoints(output_dir, checkpoint)
        distributed.barrier()
        return checkpoint
    newest, skipped = newest_complete_checkpoint(output_dir)
    if distributed.is_main:
        for folder, reason in skipped:
            logger.warning("skipping %s: incomplete checkpoint (%s)", folder, reason)
    if newest is None:
        if outputs.resume_from_checkpoint == RESUME_LATEST:
            raise UserError(f"--resume_from_checkpoint: no complete checkpoint-* folder in {output_dir}")
        return None
    recorded = _recorded_identity(output_dir)
    if recorded != identity:
        differences = "; ".join(identity_differences(recorded, identity)) if recorded else f"it has no {RUN_FILE}"
        raise UserError(
            f"{output_dir} holds {newest.name} of another run ({differences}); choose another --output_dir, or "
            f"continue it with --resume_from_checkpoint {newest}"
        )
    return newest


def set_aside_abandoned_checkpoints(output_dir: Path, resumed: Path) -> Path | None:
    """Move the checkpoints in `output_dir` at or after the step of `resumed` (but `resumed` itself) into
    output_dir/abandoned-<time>/, saying so: the newer ones are a branch an explicit resume abandons, which
    rotation would keep over this run's own checkpoints and an automatic resume would continue. Returns the folder
    they went to (None: nothing to set aside)."""
    step = json.loads((Path(resumed) / TRAINER_STATE_NAME).read_text())["global_step"]
    abandoned = [folder for folder in checkpoint_folders(output_dir)
                 if checkpoint_step(folder) >= step and folder.resolve() != Path(resumed).resolve()]
    if not abandoned:
        return None
    destination = output_dir / f"{ABANDONED_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}"
    destination.mkdir()
    for folder in abandoned:
        folder.rename(destination / folder.name)
    logger.warning("resuming from %s abandons %s: set aside in %s, never resumed from (delete it when it is no "
                   "longer needed)", resumed, ", ".join(folder.name for folder in abandoned), destination)
    return destination


def _recorded_identity(output_dir: Path) -> dict | None:
    run_file = output_dir / RUN_FILE
    return json.loads(run_file.read_text()) if run_file.exists() else None


def completed_evaluation(path: Path, identity: dict, metric: Metric, num_samples: int) -> float | None:
    """The score in `path` if this same run already wrote it (for the same number of samples), else None."""
    if not path.is_file() or _recorded_identity(path.parent) != identity:
        return None
    report = json.loads(path.read_text())
    if metric.name not in report or len(report.get("answers_unique", ())) != num_samples:
        return None
    return report[metric.name]


def record_run(output_dir: Path, identity: dict, distributed: Distributed) -> None:
    if distributed.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        temporary = output_dir / f"{RUN_FILE}.tmp"
        temporary.write_text(json.dumps(identity, indent=1) + "\n")
        temporary.replace(output_dir / RUN_FILE)


def discard_half_written_outputs(output_dir: Path, created_output_dir: bool, distributed: Distributed) -> None:
    """After a user error (a bad sample only the data loader finds, a diverged loss, a full disk): remove the
    checkpoint folders left incomplete after the newest complete one, and the output folder if this run created it
    and nothing else is in it. Everything complete stays: checkpoints, the evaluation before training (which a rerun
    of the same run reads back), the TensorBoard logs."""
    if not distributed.is_main or not output_dir.is_dir():
        return
    newest = checkpoint_step(newest_complete_checkpoint(output_dir)[0] or output_dir / "checkpoint-0") or 0
    for folder in checkpoint_folders(output_dir):
        if checkpoint_step(folder) > newest and why_incomplete(folder) is not None:
            logger.info("deleting %s: half-written by this run", folder)
            shutil.rmtree(folder, ignore_errors=True)
    if created_output_dir and not any(output_dir.iterdir()):
        output_dir.rmdir()
