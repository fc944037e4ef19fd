"""Training really learns: on a task that can only be solved by looking at the image (name its solid colour;
the question is always the same), a full finetuning run through the real script (generation, metric and
all) goes from no correct answer to all of them.

The bounds: the untrained tiny model generates noise (0.0); a model that ignored the image could at best
always answer one colour, 1/3 of the balanced evaluation set, so `after >= 0.9` (all 6 right) needs vision.
"""

from tests.scripts.e2e import COLOURS, SCRIPTS, colour_task, read_eval


def test_colour_naming_is_learnt(launcher, tiny_model_dir, tmp_path):
    data_dir = colour_task(tmp_path / "colours", num_train=24, num_val=6)
    output_dir = tmp_path / "out"
    args = [
        "--model_name_or_path", tiny_model_dir, "--data_dir", data_dir, "--output_dir", output_dir,
        "--batch_size", "2", "--batch_size_per_gpu", "2", "--num_train_epochs", "8", "--learning_rate", "3e-3",
        "--warmup_steps", "5", "--num_crops", "1", "--dataloader_num_workers", "0", "--logging_steps", "12",
        "--no-tqdm", "--max_new_tokens", "4",
    ]
    launcher.run(SCRIPTS["ucf101"], args).check()

    before, after = read_eval(output_dir, "before"), read_eval(output_dir, "after")
    assert len(before["answers_unique"]) == len(after["answers_unique"]) == 6
    assert sorted(answer["answer"] for answer in after["answers_unique"]) == sorted(list(COLOURS) * 2)
    assert before["accuracy"] <= 0.5, before["generated_texts_unique"]
    assert after["accuracy"] >= 0.9, after["generated_texts_unique"]
