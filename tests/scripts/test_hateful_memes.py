"""finetune_hf_trainer_hateful_memes.py end to end with every strategy, on the_cauldron schema (one meme per
row, yes/no answers) read from a save_to_disk folder and from a parquet file, its first --eval_size rows
held out for evaluation."""

import pytest

from tests.scripts.e2e import SCRIPTS, STRATEGIES, assert_finished_run, fast_args, read_eval, write_cauldron

DATA_FORMAT = {"full": "disk", "frozen": "parquet", "lora": "parquet", "qlora": "disk"}
NUM_ROWS, EVAL_SIZE = 7, 3  # 4 training rows: two optimizer steps of 2


@pytest.fixture(scope="module")
def runs(launcher, tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("hateful_memes")
    data = {fmt: write_cauldron(root / "data", "hateful_memes", NUM_ROWS, fmt) for fmt in ("disk", "parquet")}
    jobs = {
        strategy: (
            SCRIPTS["hateful_memes"],
            fast_args(tiny_model_dir, root / strategy, "--dataset_path", data[fmt], "--eval_size", str(EVAL_SIZE),
                      *STRATEGIES[strategy]),
        )
        for strategy, fmt in DATA_FORMAT.items()
    }
    return root, launcher.run_many(jobs)


@pytest.mark.parametrize("strategy", DATA_FORMAT)
def test_trains_saves_reloads_and_evaluates(runs, strategy, tiny_model_dir):
    root, results = runs
    assert_finished_run(results[strategy], root / strategy, strategy, tiny_model_dir, num_eval=EVAL_SIZE)
    report = read_eval(root / strategy, "after")
    assert report["metric"] == "accuracy"
    assert report["ids"] == [f"hateful_memes-{i}" for i in range(EVAL_SIZE)]  # the first rows are held out
    assert report["references"] == [["yes"], ["no"], ["no"]]  # red, green, blue memes
