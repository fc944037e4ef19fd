"""finetune_hf_trainer_docvqa.py end to end with every strategy: the mini-train split of
nielsr/docvqa_1200_examples (full, frozen) and --full_train on the_cauldron's docvqa subset with evaluation on
a separate copy of the 1200-examples test split (--eval_dataset_path; LoRA, QLoRA), scored with ANLS."""

import pickle
import sys

import datasets
import pytest

from common.config import DataConfig
from common.errors import UserError
from tests.scripts.e2e import (
    SCRIPTS,
    STRATEGIES,
    assert_finished_run,
    colour_names,
    fast_args,
    load_module,
    read_eval,
    write_cauldron,
    write_docvqa,
)

NUM_TRAIN, NUM_TEST = 4, 3
FULL_TRAIN = {"lora", "qlora"}


@pytest.fixture(scope="module")
def runs(launcher, tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("docvqa")
    mini = write_docvqa(root / "mini", NUM_TRAIN, NUM_TEST)
    cauldron = write_cauldron(root / "cauldron", "docvqa", NUM_TRAIN, "parquet")
    data = {
        strategy: ["--full_train", "--dataset_path", cauldron, "--eval_dataset_path", mini]
        if strategy in FULL_TRAIN else ["--dataset_path", mini]
        for strategy in STRATEGIES
    }
    jobs = {
        strategy: (SCRIPTS["docvqa"], fast_args(tiny_model_dir, root / strategy, *data[strategy], *flags))
        for strategy, flags in STRATEGIES.items()
    }
    return root, launcher.run_many(jobs)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_trains_saves_reloads_and_evaluates(runs, strategy, tiny_model_dir):
    root, results = runs
    assert_finished_run(results[strategy], root / strategy, strategy, tiny_model_dir, num_eval=NUM_TEST)
    report = read_eval(root / strategy, "after")
    assert list(report) == ["answers_unique", "generated_texts_unique", "anls", "anls_case_insensitive"]
    assert report["answers_unique"] == [[name, f"{name} page"] for name in colour_names(NUM_TEST, 1)]
    assert "ANLS (case-insensitive, as the DocVQA challenge) after finetuning: " in results[strategy].stdout


@pytest.fixture(scope="module")
def script(tmp_path_factory):
    module = load_module(SCRIPTS["docvqa"], "docvqa_script")
    sys.modules["docvqa_script"] = module  # importable by name, as __main__ is in a real run
    yield module
    del sys.modules["docvqa_script"]


def load(script, dataset_path=None, eval_dataset_path=None, full_train=False, seed=42):
    data = DataConfig(dataset_path=dataset_path, data_dir=None, eval_size=500, max_eval_samples=None, seed=seed)
    return script.load_docvqa(data, script.DocVQAOptions(full_train=full_train, eval_dataset_path=eval_dataset_path))


def test_splits_and_per_epoch_answer_draws(script, tmp_path):
    """Mini-train: every train row (all 1,000 of the real split), a drawn accepted answer per (seed, epoch,
    row); evaluation: the test split with every accepted answer as references; the datasets pickle."""
    data = write_docvqa(tmp_path / "data", num_train=40, num_test=2)
    train, evaluation = load(script, dataset_path=str(data))
    assert (len(train), len(evaluation)) == (40, 2)
    answers = [train[i].turns[0].assistant for i in range(40)]
    assert all(answer in (name, f"{name} page") for answer, name in zip(answers, colour_names(40), strict=True))
    assert len(set(answers)) > 3  # both accepted answers get drawn
    assert answers == [load(script, dataset_path=str(data))[0][i].turns[0].assistant for i in range(40)]
    train.set_epoch(1)
    assert [train[i].turns[0].assistant for i in range(40)] != answers
    assert evaluation[0].references == ["green", "green page"]
    assert evaluation[0].turns[0].user == "What colour is the page?\nAnswer briefly."
    assert pickle.loads(pickle.dumps(train))[1].turns[0].assistant == train[1].turns[0].assistant


def test_full_train_reads_the_cauldron_and_evaluates_on_the_eval_dataset(script, tmp_path):
    mini = write_docvqa(tmp_path / "mini", num_train=1, num_test=2)
    cauldron = write_cauldron(tmp_path / "cauldron", "docvqa", 6, "disk")
    train, evaluation = load(script, full_train=True, dataset_path=str(cauldron), eval_dataset_path=str(mini))
    assert (len(train), len(evaluation)) == (6, 2)  # no row of the cauldron is held out
    pairs = {(train[i].turns[0].user, train[i].turns[0].assistant) for i in range(6)}
    assert {user for user, _ in pairs} <= {"What colour is the page?", "Name the colour."}
    with pytest.raises(UserError, match=r"has splits \['train'\], not 'test'; evaluation reads the test split"):
        load(script, full_train=True, dataset_path=str(cauldron))  # the eval copy defaults to --dataset_path
    with pytest.raises(UserError, match="--eval_dataset_path .*missing does not exist"):
        load(script, dataset_path=str(mini), eval_dataset_path=str(tmp_path / "missing"))
    assert isinstance(datasets.load_from_disk(str(cauldron))["train"], datasets.Dataset)
