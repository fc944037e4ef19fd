"""Checkpoints that count only when complete, and which one a run resumes from.

A checkpoint folder (`checkpoint-N/`: the model, the optimizer — DeepSpeed's `global_stepN/` shards, one per
rank, under ZeRO-2 —, scheduler, RNG states of every rank and the Trainer state) is complete when it holds
`checkpoint_complete.json`, written last, once every rank has written its part. The file lists every other
file with its size, so a folder truncated later (a copy cut short, a deletion killed half-way) no longer
counts either. A kill at any moment therefore leaves either a complete checkpoint or a folder that is visibly
incomplete: automatic resume skips such folders (and says so); an explicit path to one is refused.

`ResumableTrainer` is the Trainer that writes checkpoints this way (the ranks agree before anything is touched: a
rank whose peers are gone writes nothing, and a complete checkpoint at the step being saved is kept), keeps
`--save_total_limit` of them only once the newest is complete, and trains nothing more when it resumes from a
checkpoint taken at the end. `export_checkpoint_model` copies a checkpoint's model (--keep_best's final model);
`writing` turns a full disk into one error that names the checkpoint the same command resumes from.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import CONFIG_NAME

from .distributed import ONE_PROCESS, Distributed
from .errors import UserError

logger = logging.getLogger(__name__)

COMPLETE_FILE = "checkpoint_complete.json"
MODEL_CONFIG = CONFIG_NAME  # a model folder's config.json
_CHECKPOINT_NAME = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


class IncompleteCheckpointError(UserError):
    """An explicit --resume_from_checkpoint names a folder that is not a complete checkpoint."""


class OutOfDiskSpaceError(UserError):
    """The filesystem of the output folder filled up while something was written (exit 1)."""


# Below this much free space, torch's serialization failure ("unexpected pos ...": its writer stops short) means a
# full disk: the half-written file then takes the last free blocks.
NEARLY_FULL_BYTES = 16 * 2**20


@contextlib.contextmanager
def writing(what: str, path: Path, output_dir: Path) -> Iterator[None]:
    """Write `what` to `path` in the block; a full disk there becomes one OutOfDiskSpaceError naming what was being
    written, where, the free space, and the newest complete checkpoint in `output_dir`, which the same command
    resumes from. Other errors pass unchanged."""
    try:
        yield
    except Exception as error:
        free = _free_bytes(Path(path))
        if not _is_out_of_space(error, free):
            raise
        newest, _ = newest_complete_checkpoint(output_dir)
        resume = (f"the same command resumes from {newest}, the newest complete checkpoint" if newest else
                  "no complete checkpoint yet: the same command starts the run again")
        raise OutOfDiskSpaceError(
            f"out of disk space writing {what} to {path} ({_size(free)} free there); free space (or choose an "
            f"--output_dir on a larger filesystem) and run again: {resume}"
        ) from error


def _is_out_of_space(error: BaseException, free: int | None) -> bool:
    """Whether `error`, or an error it was raised from, says the disk is full."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(error) or "Disk quota exceeded" in str(error):  # safetensors, DeepSpeed
            return True
        if isinstance(error, RuntimeError) and "inline_container" in str(error):  # torch.save
            return free is not None and free < NEARLY_FULL_BYTES
        error = error.__cause__ or error.__context__
    return False


def _free_bytes(path: Path) -> int | None:
    for folder in (path, *path.parents):
        if folder.exists():
            return shutil.disk_usage(folder).free
    return None


def _size(count: int | None) -> str:
    if count is None:
        return "unknown space"
    if count < 1024:
        return f"{count} bytes"
    for unit in ("KiB", "MiB", "GiB"):
        count /= 1024
        if count < 1024:
            return f"{count:.1f} {unit}"
    return f"{count / 1024:.1f} TiB"


def checkpoint_step(folder: Path) -> int | None:
    """N for a folder named checkpoint-N, else None."""
    match = _CHECKPOINT_NAME.match(Path(folder).name)
    return int(match.group(1)) if match else None


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def flushed_files(folder: Path) -> dict[str, int]:
    """{path relative to `folder`: size} of the checkpoint's files as this process sees them, each flushed to
    disk first."""
    files = {}
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file() and path.name != COMPLETE_FILE and not path.name.endswith(".tmp"):
            _fsync(path)
            files[path.relative_to(folder).as_posix()] = path.stat().st_size
    return files


def mark_complete(folder: Path, files: dict[str, int] | None = None) -> None:
    """Declare `folder` complete: write the manifest of its `files` (default: all of them, flushed to disk)
    under a temporary name and rename it into place (a rename is atomic: the manifest is whole or absent)."""
    folder = Path(folder)
    files = flushed_files(folder) if files is None else files
    temporary = folder / f"{COMPLETE_FILE}.{os.getpid()}.tmp"  # per process: never two writers of one file
    with open(temporary, "w") as file:
        json.dump({"step": checkpoint_step(folder), "files": files}, file, indent=1)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, folder / COMPLETE_FILE)
    _fsync(folder)


def why_incomplete(folder: Path) -> str | None:
    """None when `folder` is a complete checkpoint, else what is missing."""
    folder = Path(folder)
    manifest_path = folder / COMPLETE_FILE
    if not manifest_path.is_file():
        return f"no {COMPLETE_FILE}: it was not finished being written"
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"{COMPLETE_FILE} is unreadable"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes instead of {size}"
    return None


def checkpoint_folders(output_dir: Path) -> list[Path]:
    """The checkpoint-N folders in `output_dir`, oldest (lowest N) first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    folders = [path for path in output_dir.iterdir() if path.is_dir() and checkpoint_step(path) is not None]
    return sorted(folders, key=checkpoint_step)


def newest_complete_checkpoint(output_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete checkpoint in `output_dir` (None if there is none), and the newer incomplete
    folders passed over on the way, each with the reason."""
    skipped = []
    for folder in reversed(checkpoint_folders(output_dir)):
        reason = why_incomplete(folder)
        if reason is None:
            return folder, skipped
        skipped.append((folder, reason))
    return None, skipped


def check_complete(folder: Path) -> Path:
    """`folder` if it is a complete checkpoint; else an IncompleteCheckpointError that says why and names the
    newest complete checkpoint beside it, if any."""
    folder = Path(folder)
    reason = why_incomplete(folder)
    if reason is None:
        return folder
    if checkpoint_folders(folder):
        hint = f"; it holds checkpoint folders: give one of them, e.g. {checkpoint_folders(folder)[-1]}"
    else:
        newest, _ = newest_complete_checkpoint(folder.parent)
        hint = f"; the newest complete checkpoint beside it is {newest}" if newest else ""
    raise IncompleteCheckpointError(
        f"--resume_from_checkpoint {folder} is not a complete checkpoint ({reason}){hint}"
    )


def remove_checkpoint(folder: Path) -> None:
    """Delete a checkpoint folder so that a kill part-way never leaves it looking complete: the manifest goes
    first."""
    (Path(folder) / COMPLETE_FILE).unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)


def rotate_checkpoints(output_dir: Path, keep: int | None, newest: Path, best: Path | None = None) -> None:
    """Keep `keep` complete checkpoints (always `newest`, the one just written, and `best`, beyond the count):
    delete the oldest others, and the incomplete leftovers (of killed saves or deletions) older than `newest`."""
    if not keep or keep < 1:
        return
    newest_step = checkpoint_step(newest)
    complete = []
    for folder in checkpoint_folders(output_dir):
        if folder in (Path(newest), best and Path(best)):
            continue
        if why_incomplete(folder) is None:
            complete.append(folder)
        elif checkpoint_step(folder) < newest_step:
            logger.info("deleting %s: an incomplete leftover", folder)
            remove_checkpoint(folder)
    for folder in complete[: max(0, len(complete) - (keep - 1))]:
        logger.info("deleting %s: --save_total_limit %d", folder, keep)
        remove_checkpoint(folder)


def _files_of_all_ranks(folder: Path, distributed: Distributed) -> dict[str, int]:
    """The checkpoint's files as every rank sees them, flushed to disk by each (a collective: every rank calls
    it). On a shared filesystem a node may list another node's fresh files late (NFS caches directories), but
    each rank always sees what it wrote itself; a file still growing in a stale view is taken at its largest."""
    files = {}
    for view in distributed.gather(flushed_files(folder)):
        for name, size in view.items():
            files[name] = max(size, files.get(name, 0))
    return dict(sorted(files.items()))


# What a checkpoint holds besides the model and its processor: the state that resumes training.
_TRAINING_STATE = ("optimizer.pt", "scheduler.pt", "scaler.pt", "trainer_state.json", "latest", "zero_to_fp32.py",
                   COMPLETE_FILE)


def export_checkpoint_model(checkpoint: Path, output_dir: Path) -> None:
    """Copy the model of `checkpoint` (full weights or adapter, with config and processor) into `output_dir`, as
    the final save would write it; its training state stays behind."""
    for path in sorted(Path(checkpoint).iterdir()):
        if path.is_file() and path.name not in _TRAINING_STATE and not path.name.startswith("rng_state"):
            temporary = output_dir / f"{path.name}.tmp"
            if path.name == MODEL_CONFIG:  # written while training ran without the KV cache; the model generates with it
                config = {**json.loads(path.read_text()), "use_cache": True}
                temporary.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            else:
                shutil.copyfile(path, temporary)
            temporary.replace(output_dir / path.name)


class ResumableTrainer(Trainer):
    """The Trainer, with complete-or-visibly-incomplete checkpoints and an exact resume from the last one.

    `keep_checkpoints` replaces TrainingArguments.save_total_limit (which `training_arguments` leaves unset):
    the Trainer deletes old checkpoints before the new one is finished, so a kill then could leave no complete one.
    `distributed`: the run's processes, which write a checkpoint together.
    """

    def __init__(self, *args, keep_checkpoints: int | None = None, distributed: Distributed = ONE_PROCESS, **kwargs):
        super().__init__(*args, **kwargs)
        self.keep_checkpoints = keep_checkpoints
        self.distributed = distributed

    # The two overrides below are of non-public Trainer methods: they take whatever the base passes, and
    # tests/common/test_trainer_hooks.py fails, naming the method, when transformers stops calling one or
    # changes its parameters.
    def _save_checkpoint(self, *args, **kwargs) -> None:
        # the Trainer's own folder (no hyperparameter search: the run directory is output_dir)
        folder = Path(self.args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        # The ranks agree first: a rank whose peers are gone (a worker killed, torchrun stopping the others) fails
        # here, before anything is removed or written, since it could not finish a save they take part in.
        if any(self.distributed.gather(self.args.should_save and why_incomplete(folder) is None)):
            # This run's checkpoint at this step, already whole (a stop requested right after it was written;
            # checkpoints of other runs or of an abandoned branch are never resumed past): it stays as it is.
            if self.args.should_save:
                logger.info("%s is already complete: kept", folder)
            return
        if self.args.should_save:
            if folder.exists():  # the leftover of a killed save: never complete while rewritten
                remove_checkpoint(folder)
            logger.info("writing %s", folder)
        self.distributed.barrier()  # nobody writes into the folder while it is being removed
        with writing(f"the checkpoint {folder.name}", folder, folder.parent):
            super()._save_checkpoint(*args, **kwargs)
            files = _files_of_all_ranks(folder, self.distributed)  # after every rank has written its part (optimizer shards, RNG state)
            if self.args.should_save:
                mark_complete(folder, files)
        if self.args.should_save:
            best = self.state.best_model_checkpoint  # the best score's (common/training_evaluation.py)
            rotate_checkpoints(folder.parent, self.keep_checkpoints, folder, Path(best) if best else None)
            logger.info("checkpoint %s is complete", folder)

    def _run_epoch(self, *args, **kwargs):
        # Resumed from a checkpoint taken at max_steps in the middle of an epoch, the Trainer would otherwise
        # run the rest of that epoch's loop and take one more optimizer step before it checks max_steps.
        if self.state.global_step >= self.state.max_steps:
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)
