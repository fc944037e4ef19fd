"""finetune_hf_trainer_hateful_memes.py end to end with every strategy, on the_cauldron schema (one meme per
row, yes/no answers) read from a save_to_disk folder and from a parquet file, its first --eval_size rows
held out for evaluation."""

import pytest

from tests.scripts.e2e import assert_finished_run, read_eval, run_cauldron_task

DATA_FORMAT = {"full": "disk", "frozen": "parquet", "lora": "parquet", "qlora": "disk"}
NUM_ROWS, EVAL_SIZE = 7, 3  # 4 training rows: two optimizer steps of 2


@pytest.fixture(scope="module")
def runs(launcher, tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("hateful_memes")
    return root, run_cauldron_task(launcher, tiny_model_dir, root, "hateful_memes", NUM_ROWS, EVAL_SIZE, DATA_FORMAT)


@pytest.mark.parametrize("strategy", DATA_FORMAT)
def test_trains_saves_reloads_and_evaluates(runs, strategy, tiny_model_dir):
    root, results = runs
    assert_finished_run(results[strategy], root / strategy, strategy, tiny_model_dir, num_eval=EVAL_SIZE)
    report = read_eval(root / strategy, "after")
    assert list(report) == ["answers_unique", "generated_texts_unique", "accuracy"]
    assert report["answers_unique"] == ["yes", "no", "no"]  # red, green, blue memes: the first rows are held out
