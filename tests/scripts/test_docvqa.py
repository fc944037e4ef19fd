"""finetune_hf_trainer_docvqa.py end to end with every strategy, on DocVQA's schema (image, question, all
accepted answers) saved with save_to_disk, scored with ANLS against every accepted answer."""

import pytest

from common.config import DataConfig
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


def test_mini_train_split_and_seeded_answers(tmp_path, monkeypatch):
    """Without --full_train the first 1% of train (at least one row); each question's training answer is one
    of its accepted answers, the same for the same seed; the datasets pickle (spawn-started workers)."""
    import pickle
    import sys

    from tests.scripts.e2e import colour_names, load_module

    script = load_module(SCRIPTS["docvqa"], "docvqa_script")
    monkeypatch.setitem(sys.modules, "docvqa_script", script)  # importable by name, as __main__ is in a real run
    data = write_docvqa(tmp_path / "data", num_train=150, num_validation=2)

    def load(full_train: bool, seed: int = 42):
        data_config = DataConfig(dataset_path=str(data), data_dir=None, eval_size=500, max_eval_samples=None, seed=seed)
        return script.load_docvqa(data_config, script.DocVQAOptions(full_train=full_train))

    train, evaluation = load(full_train=False)
    assert (len(train), len(evaluation)) == (2, 2)  # round(150 x 1%) rows; validation untouched
    assert len(load(full_train=True)[0]) == 150
    answers = [train[i].turns[0].assistant for i in range(2)]
    for answer, name in zip(answers, colour_names(2), strict=True):
        assert answer in (name, f"{name} page")
    assert answers == [load(full_train=False)[0][i].turns[0].assistant for i in range(2)]  # same seed, same answer
    assert evaluation[0].references == ["green", "green page"]
    assert pickle.loads(pickle.dumps(train))[1].turns[0].assistant == answers[1]
