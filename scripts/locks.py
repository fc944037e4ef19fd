"""The lock files: what scripts/update_lock.sh writes from uv's resolutions, and what tests/test_locks.py checks.

A lock is requirements/lock-py{X.Y}-{cpu|cuda}.txt for Python X.Y on Linux x86_64 (glibc 2.28 or newer): one
`name==version` line per package, which pip installs as it is, with the file the resolver chose for that Python
in a comment (`  # wheel: FILE`, or `  # sdist: FILE` for a package published as source only). The CUDA lock
holds torch from PyPI with its CUDA libraries; the CPU lock the same torch version's CPU build (PyTorch's CPU
index, or a local wheel that pip's find-links has) and none of the packages that only the CUDA build requires.

    python scripts/locks.py pythons                       # the Pythons that get a lock
    python scripts/locks.py version PYLOCK NAME           # the version of NAME in a uv pylock.toml
    python scripts/locks.py overrides CUDA.json CPU.json  # uv overrides that drop the CUDA build's own requirements
    python scripts/locks.py write PYLOCK LOCK HEADER [--cpu-torch VERSION --cpu-torch-file FILE]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent
PYTHONS = ("3.11", "3.12", "3.13")  # transformers 5 needs Python 3.11 or newer: no 3.10
BUILDS = ("cpu", "cuda")
PLATFORM = "x86_64-manylinux_2_28"  # uv's name for the platform the locks are for (torch's oldest glibc)
# Published as source only, and pure Python: deepspeed builds its C++/CUDA ops at run time, when they are used.
PURE_PYTHON_SDISTS = {"deepspeed"}
LINUX_X86_64 = {"extra": "", "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64"}
LOCK_LINE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)\s+#\s+(wheel|sdist):\s+(\S+)")


@dataclass(frozen=True)
class Pin:
    name: str
    version: str
    kind: str  # "wheel" or "sdist"
    file: str  # the file's name

    def line(self) -> str:
        return f"{self.name}=={self.version}  # {self.kind}: {self.file}"


def lock_path(python: str, build: str, folder: Path = REPO / "requirements") -> Path:
    return folder / f"lock-py{python}-{build}.txt"


def read_lock(path: Path) -> list[Pin]:
    """The pins of a lock; a line that pins without naming its file is an error."""
    pins = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        match = LOCK_LINE.match(line)
        if not match:
            raise ValueError(f"{path}:{number}: expected `name==version  # wheel|sdist: FILE`, got {line!r}")
        pins.append(Pin(*match.groups()))
    return pins


def pins_of(pylock: Path) -> list[Pin]:
    """Each package of a uv pylock.toml (resolved for one Python and platform) with the wheel it would install,
    else its sdist."""
    import tomllib  # Python 3.11+, update_lock.sh's (the tests only read locks)

    pins = []
    for package in tomllib.loads(pylock.read_text())["packages"]:
        wheels = package.get("wheels", [])
        if wheels:
            kind, url = "wheel", wheels[0]["url"]
        else:
            kind, url = "sdist", package["sdist"]["url"]
        pins.append(Pin(package["name"], package["version"], kind, unquote(url.rsplit("/", 1)[-1])))
    return sorted(pins, key=lambda pin: canonicalize_name(pin.name))


def cuda_only_requirements(cuda_report: Path, cpu_report: Path) -> list[str]:
    """What torch's PyPI (CUDA) build requires and its CPU build does not, from `pip install --dry-run --report`
    of each (the CUDA libraries, triton)."""
    def requirements(report: Path) -> set[str]:
        [item] = json.loads(report.read_text())["install"]
        required = (Requirement(text) for text in item["metadata"].get("requires_dist", []))
        return {canonicalize_name(requirement.name) for requirement in required
                if requirement.marker is None or requirement.marker.evaluate(LINUX_X86_64)}

    return sorted(requirements(cuda_report) - requirements(cpu_report))


def write_lock(pylock: Path, lock: Path, header: str, cpu_torch: str | None = None,
               cpu_torch_file: str | None = None) -> list[Pin]:
    """The lock from a resolution; `cpu_torch`: torch's CPU build of that version, in `cpu_torch_file`."""
    pins = pins_of(pylock)
    if cpu_torch is not None:
        pins = [Pin("torch", cpu_torch, "wheel", cpu_torch_file) if pin.name == "torch" else pin for pin in pins]
    lines = [f"# {line}" for line in header.splitlines()] + [pin.line() for pin in pins]
    lock.write_text("\n".join(lines) + "\n")
    return pins


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("pythons")
    version = commands.add_parser("version")
    version.add_argument("pylock", type=Path)
    version.add_argument("name")
    overrides = commands.add_parser("overrides")
    overrides.add_argument("cuda_report", type=Path)
    overrides.add_argument("cpu_report", type=Path)
    write = commands.add_parser("write")
    write.add_argument("pylock", type=Path)
    write.add_argument("lock", type=Path)
    write.add_argument("header")
    write.add_argument("--cpu-torch")
    write.add_argument("--cpu-torch-file")
    args = parser.parse_args(argv)
    if args.command == "pythons":
        print(*PYTHONS)
    elif args.command == "version":
        print(next(pin.version for pin in pins_of(args.pylock) if pin.name == args.name))
    elif args.command == "overrides":
        for name in cuda_only_requirements(args.cuda_report, args.cpu_report):
            print(f"{name} ; sys_platform == 'never'")  # uv drops a requirement whose marker never holds
    else:
        pins = write_lock(args.pylock, args.lock, args.header, args.cpu_torch, args.cpu_torch_file)
        print(f"{args.lock}: {len(pins)} packages", file=sys.stderr)


if __name__ == "__main__":
    main()
