"""What a run prints: our own lines (strategy, precision, trainable parameters, data sizes, progress, metrics,
where outputs went) and no library chatter by default; --verbose shows the libraries too."""

import pytest

from tests.scripts.e2e import SCRIPTS, colour_task, fast_args

LIBRARY_NOISE = [
    "Setting accelerator to CPU",  # DeepSpeed probing for a GPU
    "FutureWarning", "DeprecationWarning", "UserWarning",
    "Loading weights",  # transformers' per-shard progress bar
    "save_embedding_layers",  # PEFT's note on saving lm_head
]


@pytest.fixture(scope="module")
def runs(launcher, tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("logging")
    data = colour_task(root, num_train=4, num_val=2)
    jobs = {
        name: (SCRIPTS["ucf101"], fast_args(tiny_model_dir, root / name, "--data_dir", data, "--use_lora", *extra))
        for name, extra in (("quiet", []), ("verbose", ["--verbose"]))
    }
    return root, launcher.run_many(jobs)


def test_a_run_prints_our_lines(runs):
    root, results = runs
    out = results["quiet"].check().stdout
    for line in ("UCF-101 with LoRA on 1 process(es)", "fp32", "parameters trainable", "training samples: 4",
                 "evaluation samples: 2", "'loss'", "ACCURACY after finetuning", f"LoRA adapter saved to {root / 'quiet'}",
                 "training curves:"):
        assert line in out, f"{line!r} missing from:\n{out}"


def test_library_chatter_is_hidden_by_default(runs):
    _, results = runs
    output = results["quiet"].stdout + results["quiet"].stderr
    assert not [noise for noise in LIBRARY_NOISE if noise in output], output[-4000:]


def test_verbose_shows_the_libraries(runs):
    _, results = runs
    output = results["verbose"].check().stdout + results["verbose"].stderr
    assert "save_embedding_layers" in output or "Loading weights" in output, output[-4000:]


def test_help_prints_no_library_line_first():
    """A fresh interpreter (not the test launcher, which imported everything already): importing the
    Trainer's dependencies loads bitsandbytes, whose kernel probe must not print before the usage."""
    import subprocess
    import sys

    from tests.scripts.e2e import REPO_ROOT, script_env

    done = subprocess.run([sys.executable, str(SCRIPTS["hateful_memes"]), "--help"], cwd=REPO_ROOT, env=script_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("usage:") and not done.stderr, done.stderr[-3000:]
