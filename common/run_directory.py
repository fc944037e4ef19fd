"""The run's output directory as a record: which run it belongs to, which checkpoint a rerun resumes from, and
which evaluations it already holds.

`run.json` records the run's identity (task, model, strategy, data, num_crops). A rerun into the same
directory resumes from its newest complete checkpoint only when the identity matches, and reads back an
evaluation before training that this same run already wrote; a checkpoint of another run is refused.
After a data error the directory keeps a state to resume from, or nothing of this run's.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from .checkpoints import check_complete, newest_complete_checkpoint
from .config import RESUME_LATEST, OutputConfig, RunConfig
from .distributed import Distributed
from .errors import UserError
from .metrics import Metric

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"


def run_identity(task_name: str, config: RunConfig) -> dict:
    """What a checkpoint in output_dir must have been made by for an automatic resume to continue it."""
    data_path = config.data.data_dir or config.data.train_file or config.data.dataset_path
    return {
        "task": task_name,
        "model": config.model.name_or_path,
        "strategy": config.strategy.name,
        "data": str(Path(data_path).resolve()) if data_path else "hub",
        "num_crops": config.model.num_crops,
    }


def resolve_checkpoint(outputs: OutputConfig, identity: dict, distributed: Distributed) -> Path | None:
    """An explicit path, if it is a complete checkpoint; else the newest complete checkpoint-* in output_dir
    if this same run made it (automatic resume), passing over (and naming) incomplete ones; else None. A
    checkpoint of another run (another task, model, strategy or data) is refused."""
    if outputs.resume_from_checkpoint not in (None, RESUME_LATEST):
        return check_complete(Path(outputs.resume_from_checkpoint))
    output_dir = Path(outputs.output_dir)
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
        raise UserError(
            f"{output_dir} holds {newest.name} of another run ({recorded or 'unknown'}), not of this one "
            f"({identity}); choose another --output_dir, or continue it with --resume_from_checkpoint {newest}"
        )
    return newest


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
        (output_dir / RUN_FILE).write_text(json.dumps(identity, indent=1) + "\n")


def discard_unresumable_outputs(
    output_dir: Path, created_output_dir: bool, written: list[str], distributed: Distributed
) -> None:
    """After a data error (a bad sample only the data loader finds), leave a state to resume from (a
    checkpoint) or nothing of this run's: not a lone eval_before.json."""
    if not distributed.is_main or not output_dir.is_dir() or newest_complete_checkpoint(output_dir)[0]:
        return
    if created_output_dir:
        shutil.rmtree(output_dir, ignore_errors=True)
    for name in written:
        (output_dir / name).unlink(missing_ok=True)
