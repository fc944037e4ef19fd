"""scripts/setup_env.sh's choices — which lock, which torch build, what pip is asked — on a copy of the script with
a stand-in .venv python (it answers the script's questions and records pip's commands, installing nothing) and a
stand-in nvidia-smi that finds a GPU or none."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# The .venv's python: `-c` answers the platform question and prints the installed torch's version (from the file
# `torch`, none when absent); `-m pip` records its arguments in `pip.log` and succeeds, but for the attempt to
# install torch from a local wheel (there is none).
FAKE_PYTHON = r"""#!/usr/bin/env bash
here="$(dirname "$0")"
if [ "$1" = -c ]; then
    case "$2" in
        *platform*) echo "linux x86_64 $(cat "$here/python_version")" ;;
        *"import torch"*) [ -f "$here/torch" ] && cat "$here/torch" || exit 1 ;;
        *) exit 3 ;;
    esac
    exit 0
fi
shift 2  # -m pip
echo "$*" >> "$here/pip.log"
case "$*" in *--no-index*) exit 1 ;; esac
"""


def setup(tmp_path: Path, gpu: bool, torch: str | None, python: str = "3.11", runs: int = 1,
          **env: str) -> tuple[list[str], str]:
    """Run a copy of setup_env.sh `runs` times on a machine with or without a GPU, its .venv holding `torch` (a
    version, or None); returns the pip commands it ran and what it printed."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "setup_env.sh", repo / "scripts")
    (repo / "requirements").mkdir()
    (repo / "requirements.txt").write_text("torch>=2.6,<2.14\n")
    for build, pin in (("cpu", "torch==2.13.0+cpu  # wheel: torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"),
                        ("cuda", "torch==2.13.0  # wheel: torch-2.13.0-cp311-cp311-manylinux_2_28_x86_64.whl")):
        for version in ("3.11", "3.12", "3.13"):
            (repo / "requirements" / f"lock-py{version}-{build}.txt").write_text(f"# lock\n{pin}\nnumpy==2.3.0\n")
    venv_bin = repo / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").write_text(FAKE_PYTHON)
    (venv_bin / "python").chmod(0o755)
    (venv_bin / "python_version").write_text(python)
    if torch is not None:
        (venv_bin / "torch").write_text(torch)
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "nvidia-smi").write_text(f"#!/bin/sh\nexit {0 if gpu else 9}\n")  # -L: 0 lists a GPU
    (tools / "nvidia-smi").chmod(0o755)
    environment = {key: value for key, value in os.environ.items() if key not in ("TORCH_VERSION", "REQUIREMENTS")}
    environment.update(PATH=f"{tools}{os.pathsep}{os.environ['PATH']}", **env)
    for _ in range(runs):
        done = subprocess.run(["bash", str(repo / "scripts" / "setup_env.sh")], env=environment, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    log = venv_bin / "pip.log"
    return (log.read_text().splitlines() if log.exists() else []), done.stderr


def test_a_cpu_torch_is_replaced_by_the_cuda_build_on_a_gpu_node(tmp_path):
    """A .venv made on a CPU login node, reused on a GPU node: pip would keep 2.13.0+cpu for ==2.13.0."""
    pip, said = setup(tmp_path, gpu=True, torch="2.13.0+cpu")
    assert pip == [
        "uninstall --quiet --yes torch",
        "install --quiet torch==2.13.0 -c requirements/lock-py3.11-cuda.txt",
        "install --quiet -r requirements/lock-py3.11-cuda.txt",
    ]
    assert "replacing the CPU build of torch (2.13.0+cpu) with the CUDA build (2.13.0)" in said


def test_a_venv_that_holds_the_lock_is_left_as_it_is(tmp_path):
    """Once installed, the demo's and the tests' set-up runs no pip (nothing printed, no seconds spent resolving)."""
    pip, said = setup(tmp_path, gpu=False, torch="2.13.0+cpu", runs=2)
    assert pip == ["install --quiet -r requirements/lock-py3.11-cpu.txt"]
    assert said == ""


def test_a_changed_lock_installs_again(tmp_path):
    setup(tmp_path, gpu=False, torch="2.13.0+cpu")
    lock = tmp_path / "repo" / "requirements" / "lock-py3.11-cpu.txt"
    lock.write_text(lock.read_text().replace("numpy==2.3.0", "numpy==2.3.1"))
    environment = {key: value for key, value in os.environ.items() if key not in ("TORCH_VERSION", "REQUIREMENTS")}
    environment["PATH"] = f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"
    subprocess.run(["bash", str(tmp_path / "repo" / "scripts" / "setup_env.sh")], env=environment, check=True,
                   timeout=60)
    pip_log = tmp_path / "repo" / ".venv" / "bin" / "pip.log"
    assert pip_log.read_text().splitlines() == ["install --quiet -r requirements/lock-py3.11-cpu.txt"] * 2


def test_a_cuda_torch_on_a_gpu_node_is_kept(tmp_path):
    pip, _ = setup(tmp_path, gpu=True, torch="2.13.0")
    assert pip == ["install --quiet -r requirements/lock-py3.11-cuda.txt"]


def test_a_cpu_node_gets_the_cpu_build_from_the_cpu_index_without_a_local_wheel(tmp_path):
    pip, _ = setup(tmp_path, gpu=False, torch=None)
    assert pip == [
        "install --quiet --no-deps --no-index torch==2.13.0+cpu",
        "install --quiet --no-deps torch==2.13.0+cpu --index-url https://download.pytorch.org/whl/cpu",
        "install --quiet -r requirements/lock-py3.11-cpu.txt",
    ]


def test_a_cpu_node_with_its_cpu_build_installs_the_lock_only(tmp_path):
    pip, _ = setup(tmp_path, gpu=False, torch="2.13.0+cpu")
    assert pip == ["install --quiet -r requirements/lock-py3.11-cpu.txt"]


@pytest.mark.parametrize("python", ["3.12", "3.13"])
def test_each_python_gets_its_own_lock(tmp_path, python):
    pip, said = setup(tmp_path, gpu=True, torch=None, python=python)
    assert pip[-1] == f"install --quiet -r requirements/lock-py{python}-cuda.txt"
    assert "ranges" not in said


def test_a_python_without_a_lock_installs_the_ranges_and_says_so(tmp_path):
    pip, said = setup(tmp_path, gpu=True, torch="2.13.0+cpu", python="3.10")
    assert pip == ["uninstall --quiet --yes torch", "install --quiet torch==2.13.0", "install --quiet -r requirements.txt"]
    assert "installing the ranges of requirements.txt, not requirements/lock-py3.10-cuda.txt" in said


def test_torch_version_asks_for_another_torch_with_the_ranges(tmp_path):
    pip, _ = setup(tmp_path, gpu=True, torch="2.13.0+cpu", TORCH_VERSION="2.12.1+cpu")
    assert pip == ["install --quiet --no-deps --no-index torch==2.12.1+cpu",
                   "install --quiet --no-deps torch==2.12.1+cpu --index-url https://download.pytorch.org/whl/cpu",
                   "install --quiet -r requirements.txt"]
