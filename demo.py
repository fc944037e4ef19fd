"""The project's main job end to end on a laptop-sized problem, offline, on CPU, in a few minutes.

    scripts/demo.sh                       # sets up .venv, then runs this file
    python demo.py --out_dir demo_output  # if the environment is already set up

1. Writes a small UCF-style video set: three classes of a disc moving across a dark background, told apart
   by colour (RedBall, GreenBall, BlueBall), as `.avi` files in `{split}/{Class}/v_{Class}_gXX_cYY.avi`.
2. Converts it with `convert_ucf101.py` (frames + jsonl, the recipe's format).
3. Creates a tiny random Phi-3-V with `common.tiny_model`.
4. Finetunes it with `finetune_hf_trainer_ucf101.py` (full finetuning, Trainer + DeepSpeed ZeRO-2), which
   evaluates before and after training and draws the training curves.
5. Prints accuracy before (chance is 1/3) and after.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np

from common.cli import main_guard
from common.errors import UserError

REPO = Path(__file__).resolve().parent
CLASSES = {"RedBall": (40, 40, 230), "GreenBall": (40, 200, 40), "BlueBall": (230, 60, 40)}  # BGR
VIDEOS_PER_SPLIT = {"train": 12, "val": 4, "test": 2}


def write_ball_video(path: Path, colour: tuple[int, int, int], rng: np.random.Generator, frames: int = 12) -> None:
    """A disc of `colour` moving in a straight line with a random start and direction."""
    width, height, radius = 96, 72, 30
    position = rng.uniform([radius, radius], [width - radius, height - radius])
    velocity = rng.uniform(-4, 4, size=2)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 12, (width, height))
    for _ in range(frames):
        frame = np.full((height, width, 3), 25, dtype=np.uint8)
        cv2.circle(frame, (int(position[0]), int(position[1])), radius, colour, thickness=-1)
        writer.write(frame)
        position = np.clip(position + velocity, radius, [width - radius, height - radius])
    writer.release()


def write_video_set(root: Path, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for split, count in VIDEOS_PER_SPLIT.items():
        for name, colour in CLASSES.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                write_ball_video(folder / f"v_{name}_g{index // 4 + 1:02d}_c{index % 4 + 1:02d}.avi", colour, rng)


def run(command: list[str]) -> None:
    """One step of the demo; a failed step has printed its own error, the demo stops with its name."""
    print("$", " ".join(command), flush=True)
    status = subprocess.run(command, cwd=REPO).returncode
    if status != 0:
        raise UserError(f"{' '.join(command[1:3])} failed with exit status {status} (its message is above)")


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default="demo_output", help="folder for videos, data, model and run")
    parser.add_argument("--epochs", type=int, default=12, help="training epochs")
    parser.add_argument("--num_frames", type=int, default=3, help="frames sampled per video")
    args = parser.parse_args(argv)
    out = Path(args.out_dir).resolve()
    videos, converted, model, run_dir = (out / name for name in ("videos", "converted", "tiny_phi3v", "run"))

    write_video_set(videos)
    run([sys.executable, "convert_ucf101.py", "--src", str(videos), "--out_dir", str(converted),
         "--num_frames", str(args.num_frames), "--overwrite", "--no-tqdm"])
    run([sys.executable, "-m", "common.tiny_model", str(model), "--num_crops", "1"])
    run([sys.executable, "finetune_hf_trainer_ucf101.py", "--model_name_or_path", str(model),
         "--data_dir", str(converted), "--output_dir", str(run_dir), "--num_crops", "1",
         "--batch_size", "4", "--batch_size_per_gpu", "4", "--num_train_epochs", str(args.epochs),
         "--learning_rate", "2e-3", "--warmup_steps", "5", "--logging_steps", "5", "--max_new_tokens", "8",
         "--dataloader_num_workers", "0", "--no-tqdm"])

    results = {when: json.loads((run_dir / f"eval_{when}.json").read_text())["accuracy"] for when in ("before", "after")}
    print(f"\nUCF-style demo, {len(CLASSES)} classes (chance {1 / len(CLASSES):.2f}):")
    print(f"  accuracy before finetuning: {results['before']:.2f}")
    print(f"  accuracy after finetuning:  {results['after']:.2f}")
    print(f"  training curves: {run_dir / 'training_curves.png'}")
    return results


if __name__ == "__main__":
    main_guard(main)
