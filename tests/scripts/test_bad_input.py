"""Bad input ends with one clear message naming the problem, exit status 2 for bad flags and 1 for bad data,
no traceback, and nothing half-written in --output_dir (absent or empty afterwards)."""

import json
import subprocess
import sys

import pytest

from tests.scripts.e2e import (
    COLOUR_QUESTION,
    SCRIPTS,
    colour_task,
    fast_args,
    script_env,
)


def sample(sample_id: str, images: list[str], user: str = COLOUR_QUESTION, answer: str = "red") -> dict:
    return {"id": sample_id, "conversations": [{"images": images, "user": user, "assistant": answer}]}


def write_jsonl(path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def tags_without_images(root):
    write_jsonl(root / "colour_train.jsonl", [sample("train-0", ["train-0.png"]),
                                              sample("train-1", ["train-1.png"], "<|image_1|><|image_2|>\n" + COLOUR_QUESTION)])
    return [], [f"{root / 'colour_train.jsonl'}:2: conversations[0].user: 2 image tag(s) in the text but 1 image(s)"]


def missing_image(root):
    write_jsonl(root / "colour_train.jsonl", [sample("train-0", ["train-0.png"]), sample("train-1", ["gone.png"])])
    return [], [f"{root / 'colour_train.jsonl'}:2:", str(root / "images" / "gone.png"), "does not exist"]


def empty_dataset(root):
    (root / "colour_train.jsonl").write_text("")
    return [], [str(root / "colour_train.jsonl"), "no samples"]


def batch_not_divisible(root):
    return ["--batch_size", "3", "--batch_size_per_gpu", "2"], ["--batch_size 3", "--batch_size_per_gpu (2)"]


def too_many_crops(root):
    return ["--num_crops", "17"], ["--num_crops", "between 1 and 16", "17"]


def corrupt_training_image(root):
    # Present but undecodable: only the training data loader (a worker process here) finds out, after the
    # evaluation before training has run.
    (root / "images" / "train-3.png").write_bytes(b"not a png")
    return ["--dataloader_num_workers", "1"], ["sample train-3", "cannot read image", "train-3.png"]


def corrupt_evaluation_image(root):
    (root / "images" / "val-1.png").write_bytes(b"\x89PNG broken")
    return ["--dataloader_num_workers", "1"], ["sample val-1", "cannot read image", "val-1.png"]


def mistyped_model_folder(root):
    typo = root.parent / "tiny_modle"
    return ["--model_name_or_path", typo], [f"--model_name_or_path {typo} is not a folder (check the path)"]


def model_id_not_reachable(root):
    # looks like a hub id, so only loading finds out (offline here)
    return ["--model_name_or_path", "nobody/no-such-model"], ["cannot load --model_name_or_path nobody/no-such-model",
                                                              "give the folder of a downloaded checkpoint"]


def output_dir_is_a_file(root):
    (root / "out.txt").write_text("")
    return ["--output_dir", root / "out.txt"], [f"--output_dir {root / 'out.txt'} is a file, not a folder"]


CASES = [tags_without_images, missing_image, empty_dataset, batch_not_divisible, too_many_crops, corrupt_training_image,
         corrupt_evaluation_image, mistyped_model_folder, model_id_not_reachable, output_dir_is_a_file]
USAGE_ERRORS = {batch_not_divisible, too_many_crops, mistyped_model_folder, output_dir_is_a_file}  # exit status 2


def assert_clean_failure(returncode: int, stderr: str, expected: list[str], output_dir, status: int = 1) -> None:
    assert returncode == status, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    message = "\n".join(stderr.strip().splitlines()[-3:])
    assert message.count("error:") == 1, message
    for fragment in expected:
        assert fragment in message, f"{fragment!r} not in the last lines of stderr:\n{message}"
    # nothing half-written; what stays is complete and read back by the rerun (a data error found in training)
    left = {path.name for path in output_dir.iterdir()} if output_dir.exists() else set()
    assert left <= {"eval_before.json", "eval_before.samples.jsonl", "evaluation.html", "run.json", "runs"}, sorted(
        output_dir.rglob("*"))


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.__name__)
def test_bad_input_fails_cleanly(case, launcher, tiny_model_dir, tmp_path):
    data_dir = colour_task(tmp_path / "data", num_train=4, num_val=2)
    extra, expected = case(data_dir)
    output_dir = tmp_path / "out"
    args = fast_args(tiny_model_dir, output_dir, "--data_dir", data_dir, *extra)  # later flags win
    result = launcher.run(SCRIPTS["ucf101"], args, cwd=tmp_path)
    assert_clean_failure(result.returncode, result.stderr, expected, output_dir, 2 if case in USAGE_ERRORS else 1)


def test_no_hub_access_without_a_local_dataset(launcher, tiny_model_dir, tmp_path):
    """Without --dataset_path a task downloads its dataset; offline that is one line naming the fix."""
    output_dir = tmp_path / "out"
    result = launcher.run(SCRIPTS["nlvr2"], fast_args(tiny_model_dir, output_dir), cwd=tmp_path)
    assert_clean_failure(result.returncode, result.stderr, ["NLVR2: cannot download the dataset", "--dataset_path"],
                         output_dir)


def test_bad_input_fails_cleanly_from_the_command_line(tiny_model_dir, tmp_path):
    """The same through a plain `python SCRIPT` process (what the fork server stands in for)."""
    data_dir = colour_task(tmp_path / "data", num_train=4, num_val=2)
    extra, expected = corrupt_training_image(data_dir)
    output_dir = tmp_path / "out"
    command = [sys.executable, str(SCRIPTS["hateful_memes"]),
               *fast_args(tiny_model_dir, output_dir, "--data_dir", str(data_dir), *extra)]
    result = subprocess.run(command, cwd=tmp_path, env=script_env(), capture_output=True, text=True, timeout=300)
    assert_clean_failure(result.returncode, result.stderr, expected, output_dir)
