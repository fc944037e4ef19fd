"""The demo: synthetic videos -> convert_ucf101.py -> tiny Phi-3-V -> finetune_hf_trainer_ucf101.py."""

import json

import cv2
import numpy as np
import pytest

import demo
from tests.scripts.e2e import OP_BUILD_LINES


def test_videos_are_told_apart_by_the_disc_colour(tmp_path):
    demo.write_video_set(tmp_path)
    for split, count in demo.VIDEOS_PER_SPLIT.items():
        for name, colour in demo.CLASSES.items():
            videos = sorted((tmp_path / split / name).glob(f"v_{name}_g*_c*.avi"))
            assert len(videos) == count
            capture = cv2.VideoCapture(str(videos[0]))
            ok, frame = capture.read()
            capture.release()
            assert ok
            disc = frame.reshape(-1, 3)[frame.reshape(-1, 3).max(axis=1) > 100]
            # the disc's dominant channel is the class colour's (MJPG is lossy, so compare channels)
            assert np.argmax(disc.mean(axis=0)) == int(np.argmax(colour))


def test_demo_pipeline_writes_evaluations_and_curves(tmp_path, capfd):
    results = demo.main(["--out_dir", str(tmp_path), "--epochs", "1", "--num_frames", "1"])
    output = "".join(capfd.readouterr())
    # the demo prints ours only: no op build, no DeepSpeed accelerator probe, no saving progress bar
    library_lines = (*OP_BUILD_LINES, "[WARNING]", "get_accelerator", "Writing model shards")
    assert not [line for line in library_lines if line in output], output[-3000:]
    run = tmp_path / "run"
    for when in ("before", "after"):
        report = json.loads((run / f"eval_{when}.json").read_text())
        assert len(report["answers_unique"]) == demo.VIDEOS_PER_SPLIT["val"] * len(demo.CLASSES)
        assert report["accuracy"] == results[when]
    assert (run / "training_curves.png").stat().st_size > 0
    assert (run / "model.safetensors").exists()


@pytest.mark.slow
def test_demo_learns_far_above_chance(tmp_path):
    results = demo.main(["--out_dir", str(tmp_path)])
    assert results["before"] <= 0.5
    assert results["after"] >= 0.9
