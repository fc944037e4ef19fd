"""convert_ucf101.py on synthetic videos, then finetune_hf_trainer_ucf101.py on its output (--data_dir,
the generic format) end to end with every strategy."""

import json

import pytest

from tests.scripts.e2e import SCRIPTS, STRATEGIES, assert_finished_run, convert_ucf, fast_args, read_eval

NUM_FRAMES, NUM_EVAL = 8, 2  # the recipe's 8 frames per video


@pytest.fixture(scope="module")
def converted(launcher, tmp_path_factory):
    return convert_ucf(launcher, tmp_path_factory.mktemp("ucf101"), num_frames=NUM_FRAMES)


@pytest.fixture(scope="module")
def runs(launcher, tiny_model_dir, converted):
    root = converted.parent
    jobs = {
        strategy: (
            SCRIPTS["ucf101"],
            fast_args(tiny_model_dir, root / strategy, "--data_dir", converted, "--max_eval_samples", str(NUM_EVAL),
                      *flags),
        )
        for strategy, flags in STRATEGIES.items()
    }
    return root, launcher.run_many(jobs)


def test_converter_writes_the_generic_format(converted):
    records = [json.loads(line) for line in (converted / "ucf101_train.jsonl").read_text().splitlines()]
    assert [record["conversations"][0]["assistant"] for record in records] == ["Archery"] * 2 + ["BabyCrawling"] * 2
    frames = records[0]["conversations"][0]["images"]
    assert len(frames) == NUM_FRAMES and all((converted / "images" / frame).is_file() for frame in frames)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_trains_saves_reloads_and_evaluates(runs, strategy, tiny_model_dir):
    root, results = runs
    assert_finished_run(results[strategy], root / strategy, strategy, tiny_model_dir, num_eval=NUM_EVAL)
    report = read_eval(root / strategy, "after")
    assert [answer["answer"] for answer in report["answers_unique"]] == ["archery", "archery"]
    ids = [answer["id"] for answer in report["answers_unique"]]
    assert all(sample_id.startswith("val-") for sample_id in ids)
    assert [generated["id"] for generated in report["generated_texts_unique"]] == ids
