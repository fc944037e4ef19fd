"""Every command answers --help, a mistyped flag and a flag problem before torch, transformers, peft, DeepSpeed or
datasets load (CONTRIBUTING.md, Commands): checked by what the process has imported, which timing on a busy
machine could not show reliably."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "peft", "deepspeed", "datasets", "accelerate", "bitsandbytes", "pyarrow")

# A flag problem each command finds without a library (the finetuning scripts share build_parser's checks).
FLAG_PROBLEMS = {
    "predict": (["--model", "m", "--prompt", "q", "--num_crops", "40"], "--num_crops must be between 1 and 16"),
    "benchmark": (["--steps", "0"], "--steps must be at least 1"),
    "convert_ucf101": (["--num_frames", "0"], "must be >= 1"),
}
SCRIPTS = sorted(path.stem for path in REPO.glob("finetune_hf_trainer_*.py"))
for _script in SCRIPTS:
    FLAG_PROBLEMS[_script] = (["--num_crops", "40", "--data_dir", "no_such_folder"], "--num_crops must be between 1 and 16")

REQUIRED = {"predict": ["--model", "m"]}  # else argparse names the missing flag before the mistyped one

# In a fresh interpreter: the command's main with each argv; what it said, its exit status, and the libraries loaded.
PROBE = """
import contextlib, io, json, sys
from common.errors import UserError
module = __import__(sys.argv[1])
outcomes = []
for argv in json.loads(sys.argv[2]):
    said = io.StringIO()
    with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
        try:
            module.main(argv)
            status = 0
        except SystemExit as exit_:
            status = exit_.code
        except UserError as error:
            status, said = error.exit_status, io.StringIO(str(error))
    outcomes.append([status, said.getvalue()])
print(json.dumps({"outcomes": outcomes, "loaded": [name for name in json.loads(sys.argv[3]) if name in sys.modules]}))
"""


def test_every_command_is_covered():
    assert len(SCRIPTS) >= 4 and {"predict", "benchmark", "convert_ucf101"} <= set(FLAG_PROBLEMS)


@pytest.mark.parametrize("command", sorted(FLAG_PROBLEMS))
def test_help_and_flag_errors_load_no_library(command):
    flag_problem, message = FLAG_PROBLEMS[command]
    argvs = [["--help"], [*REQUIRED.get(command, []), "--no_such_flag"], flag_problem]
    done = subprocess.run(
        [sys.executable, "-c", PROBE, command, json.dumps(argvs), json.dumps(HEAVY)],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    (help_status, help_text), (typo_status, typo_text), (problem_status, problem_text) = result["outcomes"]
    assert help_status == 0 and "usage:" in help_text
    assert typo_status == 2 and "unrecognized arguments: --no_such_flag" in typo_text
    assert problem_status == 2 and message in problem_text
    assert result["loaded"] == []
