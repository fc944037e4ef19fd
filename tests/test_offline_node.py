"""The offline GPU node pipeline end to end on CPU: an emulated node (a venv with a CPU torch, an out-of-range
transformers and some of the other packages, no datasets/deepspeed/bitsandbytes), its freeze file,
scripts/make_wheelhouse.sh, then scripts/gpu_check.sh --python ... --wheelhouse ... --dry-run with the network
cut (`unshare -n`): exit 0, a passing report, at most 8 files in --out, the node's `pip freeze` unchanged.

Needs the package index (to build the node and the wheelhouse) and root for `unshare -n`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from packaging.tags import sys_tags
from packaging.utils import parse_wheel_filename

REPO = Path(__file__).resolve().parent.parent
# Present on the node, as on the clusters' CUDA images; transformers there is older than requirements.txt allows.
NODE_PACKAGES = ["transformers==5.17.0", "accelerate", "peft", "safetensors", "tokenizers", "numpy", "pillow",
                 "pytest", "matplotlib", "pandas", "pyarrow", "opencv-python-headless"]

pytestmark = pytest.mark.slow


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, **kwargs)
    assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def freeze(python: Path) -> str:
    return run([str(python), "-m", "pip", "freeze"]).stdout


@pytest.fixture(scope="module")
def node(tmp_path_factory) -> Path:
    """The node's python: a venv with this machine's CPU torch (no CUDA libraries) and NODE_PACKAGES."""
    root = tmp_path_factory.mktemp("node")
    run([sys.executable, "-m", "venv", str(root / "venv")])
    python = root / "venv" / "bin" / "python"
    run([str(python), "-m", "pip", "install", "--quiet", f"torch=={torch.__version__}", *NODE_PACKAGES], timeout=1200)
    return python


def test_wheelhouse_then_offline_gpu_check_leaves_the_node_untouched(node, tmp_path):
    target_python = f"{sys.version_info.major}.{sys.version_info.minor}"
    (tmp_path / "freeze.txt").write_text(freeze(node))
    wheels = tmp_path / "wheelhouse"
    made = run(["scripts/make_wheelhouse.sh", "--out", str(wheels), "--target-freeze", str(tmp_path / "freeze.txt"),
                "--target-python", target_python, "--cuda", "13"], timeout=1200)
    assert "MiB in all" in made.stdout
    manifest = json.loads((wheels / "manifest.json").read_text())
    shipped = {row["name"]: row for row in manifest["wheels"]}
    assert {"transformers", "datasets", "deepspeed", "bitsandbytes"} <= set(shipped)
    assert shipped["transformers"]["why"] == "node has 5.17.0" and shipped["datasets"]["why"] == "absent on the node"
    assert not {"torch", "triton", "ruff", "av", "playwright", "numpy", "pyarrow", "accelerate"} & set(shipped)
    assert not any(name.startswith("nvidia") for name in shipped)
    assert shipped["deepspeed"]["wheel"].endswith("-py3-none-any.whl")
    here = set(sys_tags())
    assert all(set(parse_wheel_filename(wheel.name)[3]) & here for wheel in wheels.glob("*.whl"))
    assert sum(wheel.stat().st_size for wheel in wheels.glob("*.whl")) == manifest["total_bytes"] < 64 * 2**20

    before = freeze(node)
    out = tmp_path / "report"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    checked = run(["unshare", "-n", "scripts/gpu_check.sh", "--python", str(node), "--wheelhouse", str(wheels),
                   "--out", str(out), "--dry-run", "--budget", "900"], env=env, timeout=1200)
    assert "GPU check (dry-run): PASS" in checked.stdout
    assert sorted(path.name for path in out.iterdir()) == ["gpu_check.json", "gpu_check.md", "gpu_check_logs.tar.gz"]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["verdict"] == "pass"
    assert report["versions"]["transformers"] == shipped["transformers"]["version"]  # the wheelhouse's, not 5.17
    assert report["versions"]["torch"] == torch.__version__
    assert all(kernel.split()[0] != "unknown" for kernel in report["sdpa_kernels"].values())
    assert freeze(node) == before
