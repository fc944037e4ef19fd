"""Convert the UCF-101 video subset into the image + jsonl format of the Phi-3.5-vision finetuning recipe.

Convert, then train::

    python convert_ucf101.py                      # --out_dir ./ucf101, archive extracted under --tmp_dir /tmp/ucf101
    torchrun --nproc_per_node=4 finetune_hf_trainer_ucf101.py --data_dir ./ucf101

By default the source is ``UCF101_subset.tar.gz`` from the hub dataset ``sayakpaul/ucf101-subset``
(10 classes, splits train/val/test). ``--src`` takes that archive (.tar.gz/.tgz/.tar) or any folder laid out
as ``{split}/{Class}/{video}`` (.avi .mp4 .mov .mkv .webm), directly or under one top-level folder.
Splits missing from the source are simply absent from the output.

Output::

    out_dir/
    ├── images/{split}/{Class}/{video_stem}.{i}.jpg    i = 0 .. (frames kept) - 1
    ├── ucf101_train.jsonl / ucf101_val.jsonl / ucf101_test.jsonl
    ├── .convert_ucf101.json                           source and num_frames this folder was made from
    └── .convert_ucf101.frames.jsonl                   frames kept per converted video (for re-runs)

One jsonl line per converted video; image paths are relative to ``out_dir/images``.

Rules:

* Sampling, as the recipe: with ``n`` the frame count in the video stream's header, the frames at
  ``np.arange(0, n, n / num_frames).astype(int)``, decoded with PyAV (FFmpeg) in order, each index once: a
  video shorter than ``num_frames`` keeps fewer frames. Frames are saved as PIL saves a ``.jpg`` by default.
* Robustness beyond the recipe: a header without a frame count falls back to counting decodable frames; a
  video whose decoding ends early keeps the sampled frames that decoded; a video that is empty, cannot be
  opened, or yields no sampled frame is skipped with a WARNING on stderr and counted in the final summary.
* Ids: ``{split}-{index:010d}``, ``index`` counting every discovered video (converted or skipped) in the order
  train, val, test; classes sorted; files sorted by name. Ids are thus stable across runs.
* Archives (the default hub one included) are extracted into ``--tmp_dir`` (default ``/tmp/ucf101``, which must
  not hold anything else), removed when done.
* Resume: frames are staged and renamed into place, jsonl files are replaced atomically, so an interrupted run
  can simply be re-run; videos recorded as converted whose frames all exist are not decoded again. Reusing an out_dir made from
  another source or num_frames is refused unless ``--overwrite``. A local source is known by its path only:
  after changing videos in place, convert again with ``--overwrite``.
* Exit status is non-zero when no video could be converted, or with ``--strict`` when any video was skipped.
"""

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import tarfile
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import av
import numpy as np
from PIL import Image
from tqdm import tqdm

# The frame-extraction workers (spawned: they import this file again) only extract frames. Errors, the guard
# and the jsonl records belong to the main process: the workers' functions (convert_video and what it calls)
# report an unusable video as a returned reason, never as a UserError.
if multiprocessing.parent_process() is None:
    from common.cli import main_guard
    from common.data import Turn
    from common.errors import UsageError, UserError

HUB_REPO_ID = "sayakpaul/ucf101-subset"
HUB_FILENAME = "UCF101_subset.tar.gz"
HUB_SOURCE = f"hf://datasets/{HUB_REPO_ID}/{HUB_FILENAME}"
SPLITS = ("train", "val", "test")
VIDEO_EXTENSIONS = (".avi", ".mp4", ".mov", ".mkv", ".webm")
ARCHIVE_EXTENSIONS = (".tar.gz", ".tgz", ".tar")
MANIFEST_NAME = ".convert_ucf101.json"
FRAMES_RECORD_NAME = ".convert_ucf101.frames.jsonl"
STAGING_NAME = ".staging"
IMAGES_NAME = "images"
PROMPT_TEMPLATE = "Classify the video into one of the following classes: {}."


@dataclass(frozen=True)
class Video:
    index: int
    split: str
    label: str
    path: Path  # where the file can be read now (possibly inside a temporary extraction)
    shown_path: str  # how to name it to the user

    def frame_names(self, count: int) -> list[str]:
        """Frame image paths relative to ``out_dir/images``, always with forward slashes."""
        return [f"{self.split}/{self.label}/{self.path.stem}.{i}.jpg" for i in range(count)]


@dataclass(frozen=True)
class FrameJob:
    """Everything a worker process needs to convert one video (plain strings: cheap to pickle)."""

    video_path: str
    frame_prefix: str  # final frame i is f"{frame_prefix}.{i}.jpg"
    num_frames: int
    staging_dir: str


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Convert UCF-101 videos into sampled JPEG frames and the recipe's ucf101_{split}.jsonl files.",
    )
    parser.add_argument(
        "--out_dir", type=Path, default=Path("./ucf101"),
        help="Folder to write images/ and the jsonl files into (default: ./ucf101).",
    )
    parser.add_argument(
        "--tmp_dir", type=Path, default=Path("/tmp/ucf101"),
        help="Where an archive source is extracted; it must not exist or be empty, and is removed afterwards "
        "(default: /tmp/ucf101).",
    )
    parser.add_argument(
        "--src",
        type=Path,
        default=None,
        help=f"Local source: a {'/'.join(ARCHIVE_EXTENSIONS)} archive or a folder with train/val/test/<Class>/ "
        f"videos. Default: download {HUB_FILENAME} from the hub dataset {HUB_REPO_ID}.",
    )
    parser.add_argument(
        "--num_frames",
        type=positive_int,
        default=8,
        help="Frames sampled uniformly from each video (default: 8).",
    )
    parser.add_argument(
        "--num_workers",
        type=positive_int,
        default=min(8, os.cpu_count() or 1),
        help="Processes decoding videos in parallel; 1 decodes in this process (default: min(8, CPU count)).",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="Delete the previous output in --out_dir (images/, ucf101_*.jsonl, manifest) and convert from scratch.",
    )
    parser.add_argument("--strict", action="store_true", help="Exit non-zero if any video was skipped.")
    parser.add_argument("--no-tqdm", dest="no_tqdm", action="store_true", help="Disable the progress bar.")
    return parser.parse_args(argv)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def validate_src(src: Path | None) -> None:
    if src is None:
        return
    if not src.exists():
        raise UsageError(f"--src {src} does not exist.")
    if src.is_file() and not src.name.lower().endswith(ARCHIVE_EXTENSIONS):
        raise UsageError(f"--src {src} is neither a folder nor a {'/'.join(ARCHIVE_EXTENSIONS)} archive.")


def source_identity(src: Path | None) -> str:
    return HUB_SOURCE if src is None else str(src.resolve())


def read_manifest(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def check_out_dir(out_dir: Path, src: Path | None, manifest: dict, overwrite: bool) -> None:
    """Refuse, before any slow work, an out_dir whose content this run must not mix with or delete."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out_dir {out_dir} exists and is not a folder.")
    if src is not None and src.resolve().is_relative_to(out_dir.resolve()):
        raise UsageError(
            f"--src {src} lies inside --out_dir {out_dir}; choose an --out_dir outside the source."
        )
    if overwrite or not out_dir.exists() or not any(out_dir.iterdir()):
        return
    previous = read_manifest(out_dir)
    if previous == manifest:
        return
    if previous is None:
        found = f"is not empty and has no readable {MANIFEST_NAME}, so it was not made by this script"
    else:
        found = f"was made from {previous.get('source')} with num_frames={previous.get('num_frames')}"
    raise UsageError(
        f"--out_dir {out_dir} {found}; this run converts {manifest['source']} with "
        f"num_frames={manifest['num_frames']}. Choose another --out_dir, or pass --overwrite to delete the "
        "previous output first."
    )


def remove_previous_output(out_dir: Path) -> None:
    for path in [
        out_dir / IMAGES_NAME,
        out_dir / STAGING_NAME,
        out_dir / MANIFEST_NAME,
        out_dir / FRAMES_RECORD_NAME,
        *out_dir.glob("ucf101_*.jsonl*"),
    ]:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def write_atomically(path: Path, text: str) -> None:
    """Readers see the old file or the complete new one, never a truncated one."""
    tmp_path = path.with_name(path.name + ".tmp")
    tmp_path.write_text(text, encoding="utf-8", newline="\n")
    os.replace(tmp_path, path)


def download_subset() -> Path:
    # Imported here: only the default source needs it, and every spawned worker re-imports this module.
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id=HUB_REPO_ID, filename=HUB_FILENAME, repo_type="dataset"))
    except OSError as error:  # hub HTTP errors and "offline, not cached" are OSErrors too
        raise UserError(
            f"Could not download {HUB_FILENAME} from {HUB_REPO_ID} ({error}). "
            "Download it elsewhere and pass it with --src."
        ) from error


def extract_archive(archive: Path, destination: Path) -> None:
    """Extract regular files and folders only, refusing members that would land outside ``destination``."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                if not (member.isfile() or member.isdir()):
                    continue  # links and device nodes are never part of a video dataset
                if os.path.isabs(member.name) or ".." in Path(member.name).parts:
                    raise UserError(f"Refusing to extract {archive}: unsafe member path {member.name!r}.")
                tar.extract(member, destination, filter="data")
    except (tarfile.TarError, EOFError, OSError) as error:
        raise UserError(f"Could not read archive {archive}: {error}") from error


def check_tmp_dir(tmp_dir: Path) -> None:
    if tmp_dir.exists() and (not tmp_dir.is_dir() or any(tmp_dir.iterdir())):
        raise UserError(
            f"--tmp_dir {tmp_dir} already exists and is not an empty folder; it is removed after the conversion, "
            "so choose a path that holds nothing else."
        )


@contextmanager
def source_folder(src: Path | None, tmp_dir: Path) -> Iterator[tuple[Path, str]]:
    """Yield the folder holding the videos and the name to show the user for it.

    Archives are extracted into ``tmp_dir``, which is removed afterwards.
    """
    if src is not None and src.is_dir():
        yield src, str(src)
        return
    check_tmp_dir(tmp_dir)
    archive = download_subset() if src is None else src
    tmp_dir.mkdir(parents=True, exist_ok=True)
    try:
        extract_archive(archive, tmp_dir)
        yield tmp_dir, str(archive)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def visible_children(folder: Path) -> list[Path]:
    # Hidden entries include macOS "._name" resource forks, which carry video extensions but no video.
    return sorted(
        (child for child in folder.iterdir() if not child.name.startswith(".")), key=lambda p: p.name
    )


def find_split_parent(folder: Path, shown_as: str) -> tuple[Path, str]:
    """The folder containing the split folders: ``folder`` itself or one of its sub-folders."""
    candidates = [folder] + [child for child in visible_children(folder) if child.is_dir()]
    with_splits = [c for c in candidates if any((c / split).is_dir() for split in SPLITS)]
    if not with_splits:
        raise UserError(f"No split folder ({', '.join(SPLITS)}) found in {shown_as} or its sub-folders.")
    if with_splits[0] == folder:
        return folder, shown_as
    if len(with_splits) > 1:
        names = ", ".join(c.name for c in with_splits)
        raise UserError(
            f"Several sub-folders of {shown_as} contain split folders ({names}); point --src at one."
        )
    return with_splits[0], f"{shown_as}/{with_splits[0].name}"


def discover_videos(root: Path, shown_as: str) -> list[Video]:
    videos: list[Video] = []
    for split in SPLITS:
        if not (root / split).is_dir():
            continue
        for class_dir in (d for d in visible_children(root / split) if d.is_dir()):
            files = [
                f for f in visible_children(class_dir) if f.is_file() and f.suffix.lower() in VIDEO_EXTENSIONS
            ]
            stems = Counter(f.stem for f in files)
            clashes = sorted(f.name for f in files if stems[f.stem] > 1)
            if clashes:
                raise UserError(
                    f"{shown_as}/{split}/{class_dir.name} has videos that would share frame names: "
                    f"{', '.join(clashes)}. Rename or remove all but one."
                )
            for file in files:
                shown_path = f"{shown_as}/{split}/{class_dir.name}/{file.name}"
                videos.append(Video(len(videos), split, class_dir.name, file, shown_path))
    return videos


def sample_frame_indices(frame_count: int, num_frames: int) -> list[int]:
    """The recipe's ``np.arange(0, n, n / num_frames).astype(int)``, each index once (a frame decodes once)."""
    return sorted(set(np.arange(0, frame_count, frame_count / num_frames).astype(int).tolist()))


def header_frame_count(container: av.container.InputContainer) -> int:
    """The frame count of the video stream's header (what the recipe samples over); 0 when it is unknown."""
    return container.streams.video[0].frames


def decoded_frames(container: av.container.InputContainer) -> Iterator[av.VideoFrame]:
    """The video's frames from the start, ending quietly where decoding fails (a truncated file, say)."""
    container.seek(0)
    frames = container.decode(video=0)
    while True:
        try:
            yield next(frames)
        except (StopIteration, av.FFmpegError):
            return


def count_decodable_frames(container: av.container.InputContainer) -> int:
    return sum(1 for _ in decoded_frames(container))


def write_sampled_frames(container: av.container.InputContainer, indices: list[int], staged_dir: Path) -> int:
    """Decode from the start, as the recipe, saving the frames at ``indices`` as ``{k}.jpg``; returns how many
    were saved (fewer than ``len(indices)`` when decoding ends early)."""
    wanted = set(indices)
    saved = 0
    for position, frame in enumerate(decoded_frames(container)):
        if position > indices[-1]:
            break
        if position in wanted:
            image = Image.fromarray(frame.to_ndarray(format="rgb24")).convert("RGB")
            image.save(staged_dir / f"{saved}.jpg")  # PIL's default JPEG settings, as the recipe
            saved += 1
    return saved


def decode_sampled_frames(video_path: str, num_frames: int, staged_dir: Path) -> tuple[str | None, int]:
    """Write the sampled frames of a video into ``staged_dir``; (why the video is unusable or None, frames kept)."""
    try:
        with av.open(video_path) as container:
            if not container.streams.video:
                return "no video stream", 0
            frame_count = header_frame_count(container) or count_decodable_frames(container)
            if frame_count == 0:
                return "no decodable frames", 0
            saved = write_sampled_frames(container, sample_frame_indices(frame_count, num_frames), staged_dir)
    except av.FFmpegError:
        return "cannot be decoded", 0
    return (None, saved) if saved else ("no decodable frames", 0)


def convert_video(job: FrameJob) -> tuple[str | None, int]:
    """Write the sampled frames of one video to their final paths; (why it was skipped or None, frames kept).

    Frames are staged first and only renamed into place once all decoded, so a crash never leaves a
    complete-looking set of frames; a partial set is simply redone by the next run.
    """
    if os.path.getsize(job.video_path) == 0:
        return "empty file", 0
    staging_dir = Path(job.staging_dir)
    staging_dir.mkdir(parents=True, exist_ok=True)
    try:
        skip_reason, kept = decode_sampled_frames(job.video_path, job.num_frames, staging_dir)
        if skip_reason is None:
            Path(job.frame_prefix).parent.mkdir(parents=True, exist_ok=True)
            for i in range(kept):
                os.replace(staging_dir / f"{i}.jpg", f"{job.frame_prefix}.{i}.jpg")
        return skip_reason, kept
    finally:
        shutil.rmtree(staging_dir, ignore_errors=True)


def read_frame_counts(out_dir: Path) -> dict[int, int]:
    """Frames kept per video index, as recorded by earlier runs into this out_dir."""
    counts = {}
    try:
        lines = (out_dir / FRAMES_RECORD_NAME).read_text(encoding="utf-8").splitlines()
    except OSError:
        return counts
    for line in lines:
        try:
            record = json.loads(line)
            counts[int(record["index"])] = int(record["frames"])
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by an interruption
    return counts


def convert_videos(
    videos: list[Video], out_dir: Path, num_frames: int, num_workers: int, show_progress: bool
) -> tuple[dict[int, str], set[int], dict[int, int]]:
    """Convert the videos not converted yet.

    Returns the skip reason of each skipped video, the indices of videos whose frames already existed, and
    the frames kept per converted video.
    """
    images_dir = out_dir / IMAGES_NAME
    staging_root = out_dir / STAGING_NAME
    shutil.rmtree(staging_root, ignore_errors=True)  # left behind by an interrupted run
    recorded = read_frame_counts(out_dir)
    frame_counts = {
        v.index: recorded[v.index]
        for v in videos
        if v.index in recorded and all((images_dir / name).is_file() for name in v.frame_names(recorded[v.index]))
    }
    already_done = set(frame_counts)
    pending = [v for v in videos if v.index not in already_done]
    jobs = [
        FrameJob(str(v.path), str(images_dir / v.split / v.label / v.path.stem), num_frames,
                 str(staging_root / f"{v.index:010d}"))
        for v in pending
    ]

    skip_reasons: dict[int, str] = {}
    with conversion_results(jobs, num_workers) as results, open(
        out_dir / FRAMES_RECORD_NAME, "a", encoding="utf-8"
    ) as record:
        progress = tqdm(
            total=len(videos),
            initial=len(already_done),
            unit="video",
            desc="Converting",
            disable=not show_progress,
        )
        for video, (skip_reason, kept) in zip(pending, results, strict=True):
            if skip_reason is not None:
                skip_reasons[video.index] = skip_reason
                tqdm.write(f"WARNING: skipping {video.shown_path}: {skip_reason}", file=sys.stderr)
            else:
                frame_counts[video.index] = kept
                record.write(json.dumps({"index": video.index, "frames": kept}) + "\n")
                record.flush()
            progress.update()
        progress.close()
    shutil.rmtree(staging_root, ignore_errors=True)
    return skip_reasons, already_done, frame_counts


@contextmanager
def conversion_results(jobs: list[FrameJob], num_workers: int) -> Iterator[Iterator[tuple[str | None, int]]]:
    """Results of ``convert_video`` over ``jobs``, in job order whatever the order workers finish in."""
    if num_workers == 1 or len(jobs) <= 1:
        yield map(convert_video, jobs)
        return
    # spawn, not fork: forking a parent that may hold threads (HTTP client, progress bar) can deadlock.
    pool = ProcessPoolExecutor(max_workers=min(num_workers, len(jobs)), mp_context=get_context("spawn"))
    try:
        yield pool.map(convert_video, jobs, chunksize=4)
    finally:
        # On an error or Ctrl-C, drop the queued videos instead of converting all of them before exiting.
        pool.shutdown(cancel_futures=True)


def build_record(video: Video, frame_count: int, prompt: str) -> dict:
    # common.formats loads datasets and transformers: imported once frames are written, never for --help or a
    # flag error (CONTRIBUTING.md, Commands), nor by the frame-extraction workers
    from common.formats.generic import conversation_record

    turn = Turn(user=prompt, assistant=video.label, images=video.frame_names(frame_count))
    return conversation_record(f"{video.split}-{video.index:010d}", "ucf101", [turn])


def write_jsonl_files(out_dir: Path, videos: list[Video], frame_counts: dict[int, int]) -> None:
    prompt = PROMPT_TEMPLATE.format(", ".join(sorted({v.label for v in videos})))
    for split in SPLITS:
        jsonl_path = out_dir / f"ucf101_{split}.jsonl"
        split_videos = [v for v in videos if v.split == split]
        if not split_videos:
            jsonl_path.unlink(missing_ok=True)
            continue
        lines = [
            json.dumps(build_record(v, frame_counts[v.index], prompt)) + "\n"
            for v in split_videos
            if v.index in frame_counts
        ]
        write_atomically(jsonl_path, "".join(lines))


def print_summary(
    out_dir: Path, videos: list[Video], skip_reasons: dict[int, str], already_done: set[int], num_frames: int
) -> None:
    print(f"Converted into {out_dir} (up to {num_frames} frames per video):")
    for split in SPLITS:
        split_videos = [v for v in videos if v.split == split]
        if not split_videos:
            continue
        reasons = Counter(skip_reasons[v.index] for v in split_videos if v.index in skip_reasons)
        converted = len(split_videos) - sum(reasons.values())
        reused = sum(1 for v in split_videos if v.index in already_done)
        skipped = ", ".join(f"{count} {reason}" for reason, count in sorted(reasons.items()))
        print(
            f"  {split}: {converted} videos converted ({reused} already present), "
            f"{sum(reasons.values())} skipped" + (f" ({skipped})" if skipped else "")
        )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    validate_src(args.src)
    manifest = {"source": source_identity(args.src), "num_frames": args.num_frames}
    check_out_dir(args.out_dir, args.src, manifest, args.overwrite)

    with source_folder(args.src, args.tmp_dir) as (folder, shown_as):
        root, shown_root = find_split_parent(folder, shown_as)
        videos = discover_videos(root, shown_root)
        if not videos:
            raise UserError(f"No video files ({' '.join(VIDEO_EXTENSIONS)}) found under {shown_root}.")
        if args.overwrite:
            remove_previous_output(args.out_dir)
        args.out_dir.mkdir(parents=True, exist_ok=True)
        write_atomically(args.out_dir / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
        skip_reasons, already_done, frame_counts = convert_videos(
            videos, args.out_dir, args.num_frames, args.num_workers, show_progress=not args.no_tqdm
        )

    write_jsonl_files(args.out_dir, videos, frame_counts)
    print_summary(args.out_dir, videos, skip_reasons, already_done, args.num_frames)
    if len(skip_reasons) == len(videos):
        raise UserError(
            f"No video could be converted ({len(videos)} found, all skipped); see the warnings above."
        )
    if args.strict and skip_reasons:
        raise UserError(
            f"--strict: {len(skip_reasons)} of {len(videos)} videos were skipped; see the warnings above."
        )


if __name__ == "__main__":
    main_guard(main)
