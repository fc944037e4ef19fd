"""Tests for convert_ucf101.py on small synthetic UCF-101-like video trees (no network, no GPU)."""

import json
import os
import shutil
import subprocess
import sys
import tarfile
from contextlib import redirect_stderr, redirect_stdout
from io import BytesIO, StringIO
from pathlib import Path

import cv2
import numpy as np
import pytest

import convert_ucf101
from common.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("Archery", "BabyCrawling", "ApplyEyeMakeup")
PROMPT = "Classify the video into one of the following classes: ApplyEyeMakeup, Archery, BabyCrawling."
FRAME_SIZE = (64, 48)  # width, height
LEVEL_OFFSET, LEVEL_STEP = 8, 12  # frame k is a flat grey image of brightness 8 + 12 k


def write_video(path: Path, num_frames: int, size: tuple[int, int] = FRAME_SIZE) -> Path:
    """Write an MJPG .avi whose frame ``k`` is flat grey at brightness ``LEVEL_OFFSET + LEVEL_STEP * k``.

    The brightness survives JPEG round trips well enough for ``frame_index_of`` to recover ``k`` (k <= 20).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25, (width, height))
    assert writer.isOpened(), f"OpenCV cannot write {path}"
    for k in range(num_frames):
        writer.write(np.full((height, width, 3), LEVEL_OFFSET + LEVEL_STEP * k, dtype=np.uint8))
    writer.release()
    return path


def frame_index_of(image_path: Path) -> int:
    """The source frame index encoded in a frame written by ``write_video``."""
    image = cv2.imread(str(image_path))
    assert image is not None, f"unreadable image {image_path}"
    return round((float(image.mean()) - LEVEL_OFFSET) / LEVEL_STEP)


def make_ucf_tree(
    root: Path,
    classes: tuple[str, ...] = CLASSES,
    splits: tuple[str, ...] = ("train", "val", "test"),
    videos_per_class: int = 2,
    frames_per_video: int = 16,
    size: tuple[int, int] = FRAME_SIZE,
) -> list[Path]:
    """Create ``root/{split}/{Class}/v_{Class}_gNN_c01.avi`` videos laid out like the UCF-101 subset.

    Each class of each split gets ``videos_per_class`` videos (groups g01, g02, ...) of ``frames_per_video``
    frames written by ``write_video``, so frame indices can be read back from converted JPEGs with
    ``frame_index_of``. Returns the video paths in creation order.
    """
    return [
        write_video(root / split / label / f"v_{label}_g{group:02d}_c01.avi", frames_per_video, size)
        for split in splits
        for label in classes
        for group in range(1, videos_per_class + 1)
    ]


def make_test_tree(root: Path) -> Path:
    """The standard tree of these tests: 3 classes x 3 splits x 2 videos, plus three problem videos.

    Sorted order (index: video) is train 0-1 ApplyEyeMakeup, 2-3 Archery, 4 corrupt Archery g99, 5-6 BabyCrawling;
    val 7-8 ApplyEyeMakeup, 9-10 Archery, 11 short Archery g98, 12-13 BabyCrawling; test 14-15 ApplyEyeMakeup,
    16-17 Archery, 18-19 BabyCrawling, 20 empty BabyCrawling g99.
    """
    make_ucf_tree(root)
    (root / "train/Archery/v_Archery_g99_c01.avi").write_bytes(np.random.default_rng(0).bytes(4096))
    write_video(root / "val/Archery/v_Archery_g98_c01.avi", num_frames=5)
    (root / "test/BabyCrawling/v_BabyCrawling_g99_c01.avi").write_bytes(b"")
    return root


def run_main(argv: list[str]) -> tuple[str, str]:
    """Run ``convert_ucf101.main`` in-process; return (stdout, stderr). Errors propagate."""
    stdout, stderr = StringIO(), StringIO()
    with redirect_stdout(stdout), redirect_stderr(stderr):
        convert_ucf101.main([*argv, "--no-tqdm"])
    return stdout.getvalue(), stderr.getvalue()


def read_jsonl_texts(out_dir: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(out_dir.glob("ucf101_*.jsonl"))}


def frame_mtimes(out_dir: Path) -> dict[str, int]:
    return {str(p.relative_to(out_dir)): p.stat().st_mtime_ns for p in (out_dir / "images").rglob("*.jpg")}


@pytest.fixture(scope="module")
def src_tree(tmp_path_factory) -> Path:
    return make_test_tree(tmp_path_factory.mktemp("src") / "UCF101_subset")


@pytest.fixture(scope="module")
def converted(src_tree, tmp_path_factory):
    """One serial conversion of ``src_tree`` shared by the read-only tests: (out_dir, stdout, stderr)."""
    out_dir = tmp_path_factory.mktemp("converted") / "out"
    stdout, stderr = run_main(["--src", str(src_tree), "--out_dir", str(out_dir), "--num_workers", "1"])
    return out_dir, stdout, stderr


def test_sample_frame_indices_are_the_recipes_arange():
    """The recipe: np.arange(0, n, n / num_frames).astype(int), i.e. floor(k * n / num_frames); repeated
    indices (videos shorter than num_frames) decode once."""
    assert convert_ucf101.sample_frame_indices(16, 8) == [0, 2, 4, 6, 8, 10, 12, 14]
    assert convert_ucf101.sample_frame_indices(20, 8) == [0, 2, 5, 7, 10, 12, 15, 17]
    assert convert_ucf101.sample_frame_indices(149, 8) == [0, 18, 37, 55, 74, 93, 111, 130]
    assert convert_ucf101.sample_frame_indices(5, 8) == [0, 1, 2, 3, 4]
    assert convert_ucf101.sample_frame_indices(1, 8) == [0]
    for frame_count in range(1, 300):
        for num_frames in (1, 3, 4, 8, 16):
            expected = sorted({k * frame_count // num_frames for k in range(num_frames)})
            assert convert_ucf101.sample_frame_indices(frame_count, num_frames) == expected


def test_defaults_are_the_recipes():
    args = convert_ucf101.parse_args([])
    assert (args.out_dir, args.tmp_dir, args.num_frames, args.src) == (Path("ucf101"), Path("/tmp/ucf101"), 8, None)


def test_output_tree(converted):
    out_dir, _, _ = converted
    assert sorted(p.name for p in out_dir.iterdir()) == [
        ".convert_ucf101.frames.jsonl",
        ".convert_ucf101.json",
        "images",
        "ucf101_test.jsonl",
        "ucf101_train.jsonl",
        "ucf101_val.jsonl",
    ]
    expected = {f"val/Archery/v_Archery_g98_c01.{i}.jpg" for i in range(5)}  # 5 frames: 5 kept
    for split in ("train", "val", "test"):
        for label in CLASSES:
            stems = [f"v_{label}_g01_c01", f"v_{label}_g02_c01"]
            expected |= {f"{split}/{label}/{stem}.{i}.jpg" for stem in stems for i in range(8)}
    got = {
        p.relative_to(out_dir / "images").as_posix() for p in (out_dir / "images").rglob("*") if p.is_file()
    }
    assert got == expected
    manifest = json.loads((out_dir / ".convert_ucf101.json").read_text())
    assert manifest["num_frames"] == 8 and manifest["source"].endswith("UCF101_subset")


def test_jsonl_lines_and_ids(converted):
    out_dir, _, _ = converted
    lines = {
        split: (out_dir / f"ucf101_{split}.jsonl").read_text().splitlines()
        for split in ("train", "val", "test")
    }
    ids = {split: [json.loads(line)["id"] for line in split_lines] for split, split_lines in lines.items()}
    # indices 4 (corrupt) and 20 (empty) are consumed by the skipped videos
    assert ids["train"] == [f"train-{i:010d}" for i in (0, 1, 2, 3, 5, 6)]
    assert ids["val"] == [f"val-{i:010d}" for i in range(7, 14)]
    assert ids["test"] == [f"test-{i:010d}" for i in range(14, 20)]

    short_video_line = (
        '{"id": "val-0000000011", "source": "ucf101", "conversations": [{"images": ['
        '"val/Archery/v_Archery_g98_c01.0.jpg", "val/Archery/v_Archery_g98_c01.1.jpg", '
        '"val/Archery/v_Archery_g98_c01.2.jpg", "val/Archery/v_Archery_g98_c01.3.jpg", '
        '"val/Archery/v_Archery_g98_c01.4.jpg"], '
        '"user": "Classify the video into one of the following classes: ApplyEyeMakeup, Archery, BabyCrawling.", '
        '"assistant": "Archery"}]}'
    )
    assert lines["val"][4] == short_video_line
    first_train_line = (
        '{"id": "train-0000000000", "source": "ucf101", "conversations": [{"images": ['
        + ", ".join(f'"train/ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.{i}.jpg"' for i in range(8))
        + f'], "user": "{PROMPT}", "assistant": "ApplyEyeMakeup"}}]}}'
    )
    assert lines["train"][0] == first_train_line
    for split_lines in lines.values():
        for line in split_lines:
            record = json.loads(line)
            assert list(record) == ["id", "source", "conversations"]
            assert list(record["conversations"][0]) == ["images", "user", "assistant"]
            assert all(
                (out_dir / "images" / image).is_file() for image in record["conversations"][0]["images"]
            )
    assert all(text.endswith(b"\n") for text in read_jsonl_texts(out_dir).values())


def test_frames_are_sampled_as_the_recipe_in_order(converted):
    out_dir, _, _ = converted
    prefix = out_dir / "images/test/Archery/v_Archery_g02_c01"
    assert [frame_index_of(Path(f"{prefix}.{i}.jpg")) for i in range(8)] == [0, 2, 4, 6, 8, 10, 12, 14]


def test_short_video_keeps_each_frame_once(converted):
    out_dir, _, _ = converted
    prefix = out_dir / "images/val/Archery/v_Archery_g98_c01"
    assert [frame_index_of(Path(f"{prefix}.{i}.jpg")) for i in range(5)] == [0, 1, 2, 3, 4]
    assert not Path(f"{prefix}.5.jpg").exists()


def test_frames_are_pyav_rgb24_saved_with_pils_jpeg_defaults(converted, src_tree):
    """The recipe: frame.to_ndarray(format="rgb24") -> PIL image -> image.save("....jpg")."""
    import av
    from PIL import Image

    out_dir, _, _ = converted
    with av.open(str(src_tree / "train/Archery/v_Archery_g01_c01.avi")) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    for i, index in enumerate([0, 2, 4, 6, 8, 10, 12, 14]):
        expected = BytesIO()
        Image.fromarray(frames[index]).convert("RGB").save(expected, format="JPEG")
        assert (out_dir / f"images/train/Archery/v_Archery_g01_c01.{i}.jpg").read_bytes() == expected.getvalue()


def test_a_video_whose_decoding_ends_early_keeps_the_frames_that_decoded(tmp_path):
    import av

    video = write_video(tmp_path / "src/train/Archery/v_Archery_g01_c01.avi", num_frames=16)
    data = video.read_bytes()
    video.write_bytes(data[: int(len(data) * 0.8)])  # cut off the tail frames and the AVI index
    with av.open(str(video)) as container:
        header_count = container.streams.video[0].frames
        decodable = convert_ucf101.count_decodable_frames(container)
    if not 0 < decodable < header_count:
        pytest.skip(f"this FFmpeg build reads the truncated file differently ({header_count=}, {decodable=})")
    out_dir = tmp_path / "out"
    run_main(["--src", str(tmp_path / "src"), "--out_dir", str(out_dir), "--num_workers", "1"])
    kept = [i for i in convert_ucf101.sample_frame_indices(header_count, 8) if i < decodable]
    prefix = out_dir / "images/train/Archery/v_Archery_g01_c01"
    assert [frame_index_of(Path(f"{prefix}.{i}.jpg")) for i in range(len(kept))] == kept
    assert not Path(f"{prefix}.{len(kept)}.jpg").exists()
    record = json.loads((out_dir / "ucf101_train.jsonl").read_text())
    assert len(record["conversations"][0]["images"]) == len(kept)


def test_corrupt_and_empty_videos_are_reported_and_skipped(converted, src_tree):
    out_dir, stdout, stderr = converted
    warnings = [line for line in stderr.splitlines() if line.startswith("WARNING")]
    assert warnings == [
        f"WARNING: skipping {src_tree}/train/Archery/v_Archery_g99_c01.avi: cannot be decoded",
        f"WARNING: skipping {src_tree}/test/BabyCrawling/v_BabyCrawling_g99_c01.avi: empty file",
    ]
    assert "  train: 6 videos converted (0 already present), 1 skipped (1 cannot be decoded)" in stdout
    assert "  val: 7 videos converted (0 already present), 0 skipped" in stdout
    assert "  test: 6 videos converted (0 already present), 1 skipped (1 empty file)" in stdout
    assert not (out_dir / "images/train/Archery/v_Archery_g99_c01.0.jpg").exists()


def test_rerun_is_idempotent_and_decodes_nothing(converted, src_tree, tmp_path):
    out_dir = tmp_path / "out"
    shutil.copytree(converted[0], out_dir)  # copy2 keeps mtimes
    mtimes = frame_mtimes(out_dir)
    stdout, _ = run_main(["--src", str(src_tree), "--out_dir", str(out_dir), "--num_workers", "1"])
    assert read_jsonl_texts(out_dir) == read_jsonl_texts(converted[0])
    assert frame_mtimes(out_dir) == mtimes
    assert "  val: 7 videos converted (7 already present), 0 skipped" in stdout


def test_interrupted_run_is_finished_without_duplicates(converted, src_tree, tmp_path):
    out_dir = tmp_path / "out"
    shutil.copytree(converted[0], out_dir)
    # what a crash can leave: a video with part of its frames, leftovers of staging and atomic writes
    (out_dir / "images/val/Archery/v_Archery_g01_c01.7.jpg").unlink()
    (out_dir / "ucf101_val.jsonl").unlink()
    (out_dir / "ucf101_train.jsonl.tmp").write_text('{"id": "half a li')
    (out_dir / ".staging/0000000003").mkdir(parents=True)
    mtimes = frame_mtimes(out_dir)
    run_main(["--src", str(src_tree), "--out_dir", str(out_dir), "--num_workers", "1"])
    assert read_jsonl_texts(out_dir) == read_jsonl_texts(converted[0])
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(p.name for p in converted[0].iterdir())
    redone = {name for name, mtime in frame_mtimes(out_dir).items() if mtimes.get(name) != mtime}
    assert redone == {f"images/val/Archery/v_Archery_g01_c01.{i}.jpg" for i in range(8)}


def test_frames_of_a_video_not_recorded_as_converted_are_redone(converted, src_tree, tmp_path):
    """Frames are known complete only from the frames record (a short video keeps fewer than num_frames)."""
    out_dir = tmp_path / "out"
    shutil.copytree(converted[0], out_dir)
    record = out_dir / ".convert_ucf101.frames.jsonl"
    lines = record.read_text().splitlines()
    record.write_text("\n".join(lines[1:]) + '\n{"index": 0, "fra')  # lost the first video's line; cut tail
    mtimes = frame_mtimes(out_dir)
    run_main(["--src", str(src_tree), "--out_dir", str(out_dir), "--num_workers", "1"])
    redone = {name for name, mtime in frame_mtimes(out_dir).items() if mtimes.get(name) != mtime}
    assert redone == {f"images/train/ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.{i}.jpg" for i in range(8)}
    assert read_jsonl_texts(out_dir) == read_jsonl_texts(converted[0])


def test_archive_source_matches_folder_source_in_parallel(converted, src_tree, tmp_path):
    archive = tmp_path / "UCF101_subset.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src_tree, arcname="UCF101_subset")
    out_dir = tmp_path / "out"
    tmp_dir = tmp_path / "extracted"
    _, stderr = run_main(["--src", str(archive), "--out_dir", str(out_dir), "--num_workers", "2",
                          "--tmp_dir", str(tmp_dir)])
    assert read_jsonl_texts(out_dir) == read_jsonl_texts(converted[0])
    assert not tmp_dir.exists()  # extracted under --tmp_dir, removed afterwards
    frame = "images/val/Archery/v_Archery_g98_c01.3.jpg"
    assert (out_dir / frame).read_bytes() == (converted[0] / frame).read_bytes()
    assert f"WARNING: skipping {archive}/UCF101_subset/train/Archery/v_Archery_g99_c01.avi" in stderr

    (tmp_dir / "keep").mkdir(parents=True)
    with pytest.raises(UserError, match=r"--tmp_dir .*extracted already exists and is not an empty folder"):
        run_main(["--src", str(archive), "--out_dir", str(tmp_path / "out2"), "--tmp_dir", str(tmp_dir)])
    assert (tmp_dir / "keep").is_dir()
    assert not (out_dir / ".staging").exists()


def test_default_source_is_the_hub_archive(converted, src_tree, tmp_path, monkeypatch):
    import huggingface_hub

    archive = tmp_path / "UCF101_subset.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src_tree, arcname="UCF101_subset")
    requested = []

    def fake_download(**kwargs):
        requested.append(kwargs)
        return str(archive)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    out_dir = tmp_path / "out"
    run_main(["--out_dir", str(out_dir), "--num_workers", "1", "--tmp_dir", str(tmp_path / "extracted")])
    assert requested == [
        {"repo_id": "sayakpaul/ucf101-subset", "filename": "UCF101_subset.tar.gz", "repo_type": "dataset"}
    ]
    assert read_jsonl_texts(out_dir) == read_jsonl_texts(converted[0])
    manifest = json.loads((out_dir / ".convert_ucf101.json").read_text())
    assert manifest == {
        "source": "hf://datasets/sayakpaul/ucf101-subset/UCF101_subset.tar.gz",
        "num_frames": 8,
    }


def test_offline_default_source_is_a_clear_error(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline_download(**kwargs):
        raise LocalEntryNotFoundError("no connection and not in the cache")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline_download)
    with pytest.raises(UserError, match="Could not download UCF101_subset.tar.gz .* pass it with --src"):
        run_main(["--out_dir", str(tmp_path / "out"), "--tmp_dir", str(tmp_path / "extracted")])
    assert not (tmp_path / "out").exists()


def test_unsafe_archive_is_refused(tmp_path):
    payload = write_video(tmp_path / "payload.avi", 3)
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(payload, arcname="train/Archery/v_Archery_g01_c01.avi")
        tar.add(payload, arcname="../escaped.avi")
    with pytest.raises(UserError, match="unsafe member path '../escaped.avi'"):
        run_main(["--src", str(archive), "--out_dir", str(tmp_path / "out"), "--tmp_dir", str(tmp_path / "x")])
    assert not (tmp_path.parent / "escaped.avi").exists()
    assert not (tmp_path / "x").exists()
    assert not (tmp_path / "out").exists()


def test_out_dir_from_other_source_needs_overwrite(converted, src_tree, tmp_path):
    out_dir = tmp_path / "out"
    shutil.copytree(converted[0], out_dir)
    other_src = make_ucf_tree(
        tmp_path / "other", classes=("Basketball",), splits=("train",), videos_per_class=1
    )
    other_root = other_src[0].parents[2]
    with pytest.raises(UserError, match=r"was made from .*UCF101_subset with num_frames=8.*--overwrite"):
        run_main(["--src", str(other_root), "--out_dir", str(out_dir)])
    with pytest.raises(UserError, match="num_frames=4"):
        run_main(["--src", str(src_tree), "--out_dir", str(out_dir), "--num_frames", "4"])
    assert read_jsonl_texts(out_dir) == read_jsonl_texts(converted[0])  # untouched by the refusals

    run_main(["--src", str(other_root), "--out_dir", str(out_dir), "--overwrite", "--num_frames", "3"])
    assert sorted(p.name for p in out_dir.iterdir()) == [
        ".convert_ucf101.frames.jsonl",
        ".convert_ucf101.json",
        "images",
        "ucf101_train.jsonl",
    ]
    assert (out_dir / "ucf101_train.jsonl").read_text() == (
        '{"id": "train-0000000000", "source": "ucf101", "conversations": [{"images": ['
        '"train/Basketball/v_Basketball_g01_c01.0.jpg", "train/Basketball/v_Basketball_g01_c01.1.jpg", '
        '"train/Basketball/v_Basketball_g01_c01.2.jpg"], '
        '"user": "Classify the video into one of the following classes: Basketball.", "assistant": "Basketball"}]}\n'
    )
    assert len(list((out_dir / "images").rglob("*.jpg"))) == 3


def test_non_empty_out_dir_without_manifest_is_refused(src_tree, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="has no readable .convert_ucf101.json"):
        run_main(["--src", str(src_tree), "--out_dir", str(out_dir)])
    assert sorted(p.name for p in out_dir.iterdir()) == ["notes.txt"]


def test_strict_fails_when_videos_were_skipped(src_tree, tmp_path):
    out_dir = tmp_path / "out"
    with pytest.raises(UserError, match="--strict: 2 of 21 videos were skipped") as raised:
        run_main(["--src", str(src_tree), "--out_dir", str(out_dir), "--num_workers", "1", "--strict"])
    assert raised.value.exit_status == 1
    assert len((out_dir / "ucf101_train.jsonl").read_text().splitlines()) == 6


def test_nothing_usable_fails(tmp_path):
    src = tmp_path / "src"
    (src / "train/Archery").mkdir(parents=True)
    (src / "train/Archery/v_Archery_g01_c01.avi").write_bytes(b"not a video")
    (src / "train/Archery/v_Archery_g02_c01.avi").write_bytes(b"")
    with pytest.raises(UserError, match="No video could be converted"):
        run_main(["--src", str(src), "--out_dir", str(tmp_path / "out")])
    empty = tmp_path / "empty"
    (empty / "val/Archery").mkdir(parents=True)
    with pytest.raises(UserError, match="No video files"):
        run_main(["--src", str(empty), "--out_dir", str(tmp_path / "out2")])


def missing_path(root: Path) -> Path:
    return root / "missing"


def plain_video_file(root: Path) -> Path:
    return write_video(root / "video.avi", 3)


def folder_without_splits(root: Path) -> Path:
    write_video(root / "flat/Archery/v_Archery_g01_c01.avi", 3)
    return root / "flat"


@pytest.mark.parametrize(
    ("make_src", "message"),
    [
        (missing_path, r"--src .*missing does not exist"),
        (plain_video_file, r"--src .*video.avi is neither a folder nor a .tar.gz/.tgz/.tar archive"),
        (folder_without_splits, r"No split folder \(train, val, test\) found in .*flat or its sub-folders"),
    ],
)
def test_user_errors_are_clear_messages(tmp_path, make_src, message):
    with pytest.raises(UserError, match=message):
        run_main(["--src", str(make_src(tmp_path)), "--out_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_num_frames_must_be_positive(tmp_path):
    with pytest.raises(SystemExit) as raised, redirect_stderr(StringIO()):
        convert_ucf101.main(["--out_dir", str(tmp_path), "--num_frames", "0"])
    assert raised.value.code == 2


def test_cli_subprocess(converted, src_tree, tmp_path):
    out_dir = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": ""}
    script = str(REPO_ROOT / "convert_ucf101.py")
    done = subprocess.run(
        [sys.executable, script, "--src", str(src_tree), "--out_dir", str(out_dir), "--no-tqdm"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "  val: 7 videos converted" in done.stdout
    assert read_jsonl_texts(out_dir) == read_jsonl_texts(converted[0])

    failed = subprocess.run(
        [sys.executable, script, "--src", str(tmp_path / "missing"), "--out_dir", str(out_dir)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert failed.returncode == 2  # a usage error: the flag names a missing path
    assert failed.stderr.startswith("error: --src ") and "does not exist" in failed.stderr
    assert "Traceback" not in failed.stderr
