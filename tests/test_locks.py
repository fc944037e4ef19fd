"""requirements/lock-py*-{cpu,cuda}.txt (scripts/update_lock.sh, scripts/locks.py): a lock per Python, each pin
with an installable file for that Python on Linux x86_64, within requirements.txt's ranges. The fast tests read
the files the resolver chose when the locks were written (only Python 3.11 runs here); the slow test asks the
package index again."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.tags import compatible_tags, cpython_tags
from packaging.utils import canonicalize_name, parse_sdist_filename, parse_wheel_filename
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("locks", REPO / "scripts" / "locks.py")
locks = sys.modules["locks"] = importlib.util.module_from_spec(_spec)  # its dataclass looks itself up there
_spec.loader.exec_module(locks)

LOCKS = [(python, build) for python in locks.PYTHONS for build in locks.BUILDS]
# glibc 2.28 and every older manylinux a wheel may target (manylinux2014 is 2.17, manylinux1 2.5)
PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(28, 4, -1)] + [
    "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64"]
CUDA_ONLY = ("nvidia-", "cuda-", "triton")


def supported_tags(python: str) -> set:
    version = tuple(int(part) for part in python.split("."))
    return set(cpython_tags(version, platforms=PLATFORMS)) | set(
        compatible_tags(version, f"cp{version[0]}{version[1]}", platforms=PLATFORMS))


def pins(python: str, build: str) -> dict[str, locks.Pin]:
    return {canonicalize_name(pin.name): pin for pin in locks.read_lock(locks.lock_path(python, build))}


@pytest.mark.parametrize("python, build", LOCKS)
def test_every_pin_has_a_file_for_its_python(python, build):
    supported = supported_tags(python)
    problems = []
    for name, pin in pins(python, build).items():
        if pin.kind == "sdist":
            sdist_name, version = parse_sdist_filename(pin.file)
            if name not in locks.PURE_PYTHON_SDISTS:
                problems.append(f"{pin.name}: no wheel for Python {python}, only {pin.file}")
        else:
            sdist_name, version, _, tags = parse_wheel_filename(pin.file)
            if not tags & supported:
                problems.append(f"{pin.name}: {pin.file} does not install on Python {python}, Linux x86_64")
        if (sdist_name, version) != (name, Version(pin.version)):
            problems.append(f"{pin.name}=={pin.version}: the recorded file is {pin.file}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("python, build", LOCKS)
def test_every_requirement_is_pinned_within_its_range(python, build):
    """A requirement added to requirements.txt without running scripts/update_lock.sh fails here."""
    pinned = pins(python, build)
    problems = []
    for line in (REPO / "requirements.txt").read_text().splitlines():
        if not line.split("#")[0].strip():
            continue
        requirement = Requirement(line.split("#")[0])
        pin = pinned.get(canonicalize_name(requirement.name))
        if pin is None or not requirement.specifier.contains(Version(pin.version), prereleases=True):
            problems.append(f"{requirement}: {pin.version if pin else 'not'} in lock-py{python}-{build}.txt")
    assert not problems, "run scripts/update_lock.sh:\n" + "\n".join(problems)


@pytest.mark.parametrize("python", locks.PYTHONS)
def test_the_cpu_lock_is_the_cuda_lock_with_torchs_cpu_build(python):
    cpu, cuda = pins(python, "cpu"), pins(python, "cuda")
    assert cpu["torch"].version == f"{cuda['torch'].version}+cpu"
    assert not [name for name in cpu if name.startswith(CUDA_ONLY)]
    assert [name for name in cuda if name.startswith(CUDA_ONLY)]  # the CUDA build's libraries
    assert {name: pin.version for name, pin in cpu.items() if name != "torch"} == {
        name: pin.version for name, pin in cuda.items() if name in cpu and name != "torch"}


def test_the_requirements_folder_holds_one_lock_per_python_and_build():
    assert sorted(path.name for path in (REPO / "requirements").glob("lock-*.txt")) == sorted(
        locks.lock_path(python, build).name for python, build in LOCKS)


@pytest.mark.slow
@pytest.mark.parametrize("python", locks.PYTHONS)
def test_the_index_has_every_locked_wheel(python, tmp_path):
    """pip, for `python` on manylinux_2_28 x86_64, finds each pinned wheel on PyPI (torch's CPU build comes from
    PyTorch's own index: its version's PyPI wheel is asked for instead) and each pure-Python sdist."""
    wheels = {f"{pin.name}=={pin.version.removesuffix('+cpu')}" for build in locks.BUILDS
              for pin in pins(python, build).values() if pin.kind == "wheel"}
    sdists = {f"{pin.name}=={pin.version}" for pin in pins(python, "cuda").values() if pin.kind == "sdist"}
    (tmp_path / "wheels.txt").write_text("\n".join(sorted(wheels)) + "\n")
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": ""}  # PyPI as users see it
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    found = subprocess.run(
        # --ignore-requires-python: pip would hold a wheel's Requires-Python against the Python running the test,
        # not against --python-version (the resolver checked it against the lock's Python)
        [*pip, "install", "--dry-run", "--quiet", "--ignore-installed", "--no-deps", "--only-binary=:all:",
         "--ignore-requires-python",
         "--python-version", python, *(f"--platform={platform}" for platform in PLATFORMS),
         "--target", str(tmp_path / "target"),
         "-r", str(tmp_path / "wheels.txt")], env=env, capture_output=True, text=True, timeout=900)
    assert found.returncode == 0, found.stderr[-3000:]
    fetched = subprocess.run([*pip, "download", "--quiet", "--no-deps", "--no-binary=:all:", "--no-build-isolation",
                              "-d", str(tmp_path / "sdists"), *sorted(sdists)],
                             env=env, capture_output=True, text=True, timeout=300)
    assert fetched.returncode == 0, fetched.stderr[-3000:]
    assert len(list((tmp_path / "sdists").iterdir())) == len(sdists)
