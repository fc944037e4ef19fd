"""scripts/wheelhouse.py (behind make_wheelhouse.sh): reading the node's freeze, what the node needs from us,
the node's torch and CUDA major, the stub distributions pip resolves against, and trimming bitsandbytes."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import zipfile
from pathlib import Path

import pytest
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("wheelhouse", REPO / "scripts" / "wheelhouse.py")
wheelhouse = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(wheelhouse)

FREEZE = """\
# a comment
torch @ file:///opt/wheels/torch-2.11.0%2Bcu130-cp312-cp312-linux_x86_64.whl
Transformers==5.17.0
accelerate==1.15.0
opencv-python==4.11.0.86
-e git+https://example.invalid/repo.git#egg=local_tool
some_pkg @ file:///src/some_pkg
"""


def test_read_freeze_normalises_names_and_reads_versions_from_wheel_urls(tmp_path):
    path = tmp_path / "freeze.txt"
    path.write_text(FREEZE)
    assert wheelhouse.read_freeze(path) == {
        "torch": "2.11.0+cu130", "transformers": "5.17.0", "accelerate": "1.15.0", "opencv-python": "4.11.0.86",
    }


def test_read_freeze_errors_name_the_file(tmp_path):
    with pytest.raises(wheelhouse.WheelhouseError, match=r"missing\.txt"):
        wheelhouse.read_freeze(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    with pytest.raises(wheelhouse.WheelhouseError, match=r"empty\.txt: no `name==version` line"):
        wheelhouse.read_freeze(empty)


def test_needed_requirements_leave_out_torch_lint_video_the_browser_driver_and_what_the_node_provides(tmp_path):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("# header\ntorch>=2.6,<2.14\ntransformers>=5.23,<6\nbitsandbytes>=0.50.2,<0.51\n"
                            "opencv-python-headless>=4.10,<6\nav>=16,<20  # video\nruff>=0.17,<0.18\npytest>=9,<10\n"
                            "playwright>=1.60,<2  # page tests\n")
    everything = wheelhouse.needed_requirements(requirements, {}, qlora=True)
    assert [r.name for r in everything] == ["transformers", "bitsandbytes", "opencv-python-headless", "pytest"]
    with_opencv = wheelhouse.needed_requirements(requirements, {"opencv-python": "4.11.0.86"}, qlora=False)
    assert [r.name for r in with_opencv] == ["transformers", "pytest"]


def test_node_torch_must_be_present_and_in_range():
    requirements = REPO / "requirements.txt"
    assert wheelhouse.check_node_torch({"torch": "2.11.0+cu130"}, requirements) == Version("2.11.0+cu130")
    assert wheelhouse.check_node_torch({"torch": "2.6.0a0+ecf3bae40a"}, requirements).base_version == "2.6.0"
    with pytest.raises(wheelhouse.WheelhouseError, match="no torch"):
        wheelhouse.check_node_torch({"numpy": "2.0.0"}, requirements)
    with pytest.raises(wheelhouse.WheelhouseError, match=r"torch 2\.5\.1\+cu124 is outside"):
        wheelhouse.check_node_torch({"torch": "2.5.1+cu124"}, requirements)


def test_cuda_major_from_the_flag_or_the_torch_label():
    assert wheelhouse.cuda_major(Version("2.11.0+cu130"), None) == 13
    assert wheelhouse.cuda_major(Version("2.6.0+cu124"), None) == 12
    assert wheelhouse.cuda_major(Version("2.6.0+cu124"), 13) == 13
    assert wheelhouse.cuda_major(Version("2.11.0"), None) is None  # unknown: keep every library


def test_stubs_are_seen_as_installed_distributions(tmp_path):
    wheelhouse.write_stubs({"torch": "2.11.0+cu130", "huggingface-hub": "1.3.0"}, tmp_path)
    found = {dist.metadata["Name"]: dist.version for dist in importlib.metadata.distributions(path=[str(tmp_path)])}
    assert found == {"torch": "2.11.0+cu130", "huggingface-hub": "1.3.0"}


def test_trim_bitsandbytes_keeps_the_cpu_library_and_one_cuda_major(tmp_path):
    wheel = tmp_path / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl"
    libraries = ["cpu", "cuda121", "cuda128", "cuda130", "cuda132", "rocm64", "xpu2025"]
    names = [f"bitsandbytes/libbitsandbytes_{lib}.so" for lib in libraries] + ["bitsandbytes/__init__.py"]
    with zipfile.ZipFile(wheel, "w") as archive:
        for name in names:
            archive.writestr(name, b"x" * 100)
        archive.writestr("bitsandbytes-0.50.2.dist-info/RECORD", "".join(f"{name},sha256=a,100\n" for name in names))
    wheelhouse.trim_bitsandbytes(wheel, 13)
    with zipfile.ZipFile(wheel) as archive:
        kept = sorted(archive.namelist())
        record = archive.read("bitsandbytes-0.50.2.dist-info/RECORD").decode()
    expected = ["bitsandbytes/__init__.py", "bitsandbytes/libbitsandbytes_cpu.so",
                "bitsandbytes/libbitsandbytes_cuda130.so", "bitsandbytes/libbitsandbytes_cuda132.so"]
    assert kept == sorted([*expected, "bitsandbytes-0.50.2.dist-info/RECORD"])
    assert sorted(line.split(",")[0] for line in record.splitlines()) == expected


def test_main_reports_one_clear_error(tmp_path, capsys):
    freeze = tmp_path / "freeze.txt"
    freeze.write_text("numpy==2.0.0\n")
    code = wheelhouse.main(["--out", str(tmp_path / "wh"), "--target-freeze", str(freeze), "--target-python", "3.12"])
    assert code == 1
    assert capsys.readouterr().err.strip() == (
        "make_wheelhouse: the node's freeze has no torch: the GPU check uses the node's own CUDA torch"
    )
    assert not (tmp_path / "wh").exists()
    with pytest.raises(SystemExit) as usage:
        wheelhouse.main(["--out", "x", "--target-freeze", str(freeze), "--target-python", "312"])
    assert usage.value.code == 2
