"""finetune_hf_trainer_docvqa.py end to end with every strategy, on DocVQA's schema (image, question, all
accepted answers) saved with save_to_disk, scored with ANLS against every accepted answer."""

import pytest

from tests.scripts.e2e import SCRIPTS, STRATEGIES, assert_finished_run, fast_args, read_eval, write_docvqa

NUM_TRAIN, NUM_VALIDATION = 4, 3


@pytest.fixture(scope="module")
def runs(launcher, tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("docvqa")
    data = write_docvqa(root / "data", NUM_TRAIN, NUM_VALIDATION)
    jobs = {
        strategy: (
            SCRIPTS["docvqa"],
            # --full_train: all 4 rows (the default mini-train split is 1% of them: a single row)
            fast_args(tiny_model_dir, root / strategy, "--dataset_path", data, "--full_train", *flags),
        )
        for strategy, flags in STRATEGIES.items()
    }
    return root, launcher.run_many(jobs)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_trains_saves_reloads_and_evaluates(runs, strategy, tiny_model_dir):
    root, results = runs
    assert_finished_run(results[strategy], root / strategy, strategy, tiny_model_dir, num_eval=NUM_VALIDATION)
    report = read_eval(root / strategy, "after")
    assert report["metric"] == "anls"
    assert report["ids"] == [f"validation-{i}" for i in range(NUM_VALIDATION)]
    assert report["references"][0] == ["green", "green page"]  # every accepted answer counts
