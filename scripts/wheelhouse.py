"""The wheels an offline GPU node lacks, for scripts/make_wheelhouse.sh (which documents the flags).

The node's `pip freeze` is laid out as stub distributions (name and version only) on the resolver's path, so
pip's own resolver keeps every node package that satisfies the project's ranges and picks, for the node's
Python and manylinux, only what is missing or too old. torch is the node's and is never shipped; bitsandbytes
keeps only its CPU library and the node's CUDA major.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from urllib.parse import unquote

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

REPO = Path(__file__).resolve().parent.parent
# Not needed on the node: its own torch, the linter, PyAV (only convert_ucf101.py decodes videos) and Playwright
# (the page tests drive a browser; the GPU check runs none of them, and its driver alone is over 40 MB).
NOT_SHIPPED = {"torch", "ruff", "av", "playwright"}
# Any of these provides the `cv2` module that opencv-python-headless provides.
OPENCV = {"opencv-python", "opencv-python-headless", "opencv-contrib-python", "opencv-contrib-python-headless"}
# Published as source only: built here as pure-Python wheels (deepspeed compiles its ops at run time).
SOURCE_ONLY = {"deepspeed"}
MANYLINUX = [f"manylinux_2_{minor}_x86_64" for minor in range(28, 16, -1)] + ["manylinux2014_x86_64"]
FREEZE_LINE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:==\s*(\S+)|@\s*(\S+))")
WHEEL_VERSION = re.compile(r"/[^/]+?-([0-9][^-/]*)-[^/]+\.whl$")


class WheelhouseError(Exception):
    """A problem with the inputs or a package without a usable wheel: one message, exit 1."""


def read_freeze(path: Path) -> dict[str, str]:
    """`pip freeze` / `pip list --format=freeze` -> {canonical name: version}; `name @ URL` lines give the
    version of the wheel file they name, editable and unversioned lines are skipped."""
    try:
        lines = path.read_text().splitlines()
    except OSError as err:
        raise WheelhouseError(f"--target-freeze {path}: {err.strerror}") from None
    packages = {}
    for line in lines:
        match = FREEZE_LINE.match(line.strip())
        if not match:
            continue
        version = match.group(2) or _version_from_url(match.group(3))
        if version:
            packages[canonicalize_name(match.group(1))] = version
    if not packages:
        raise WheelhouseError(f"--target-freeze {path}: no `name==version` line (write it with `python -m pip freeze`)")
    return packages


def _version_from_url(url: str) -> str | None:
    match = WHEEL_VERSION.search(url)
    return unquote(match.group(1)) if match else None


def needed_requirements(requirements: Path, node: dict[str, str], qlora: bool) -> list[Requirement]:
    """requirements.txt less what the node never gets from us (torch, lint, video decoding, the page tests' browser
    driver, QLoRA if off)."""
    skipped = NOT_SHIPPED | (set() if qlora else {"bitsandbytes"})
    if OPENCV & set(node):
        skipped |= OPENCV
    needed = []
    for line in requirements.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and canonicalize_name(Requirement(line).name) not in skipped:
            needed.append(Requirement(line))
    return needed


def check_node_torch(node: dict[str, str], requirements: Path) -> Version:
    torch_range = next(Requirement(line.split("#")[0]) for line in requirements.read_text().splitlines()
                       if line.startswith("torch"))
    if "torch" not in node:
        raise WheelhouseError("the node's freeze has no torch: the GPU check uses the node's own CUDA torch")
    try:
        version = Version(node["torch"])
    except InvalidVersion:
        raise WheelhouseError(f"the node's torch version {node['torch']!r} is not a valid version") from None
    if Version(version.base_version) not in torch_range.specifier:
        raise WheelhouseError(f"the node's torch {version} is outside the supported range {torch_range.specifier}")
    return version


def cuda_major(torch_version: Version, requested: int | None) -> int | None:
    """--cuda, else the node torch's local label (2.11.0+cu130 -> 13); None: unknown (keep every library)."""
    if requested is not None:
        return requested
    match = re.fullmatch(r"cu(\d+?)(\d)", torch_version.local or "")
    return int(match.group(1)) if match else None


def write_stubs(node: dict[str, str], site: Path) -> None:
    """A dist-info per node package, so pip sees it as installed at its version (with no dependencies)."""
    for name, version in node.items():
        info = site / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        (info / "INSTALLER").write_text("stub\n")


def target_options(python: str) -> list[str]:
    options = ["--only-binary=:all:", "--python-version", python, "--implementation", "cp",
               "--abi", f"cp{python.replace('.', '')}", "--abi", "abi3", "--abi", "none"]
    for platform in MANYLINUX:
        options += ["--platform", platform]
    return options


def pip(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, env=env)


def build_source_only(needed: list[Requirement], node: dict[str, str], built: Path) -> None:
    """Pure-Python wheels of the source-only packages the node lacks or has out of range."""
    for requirement in needed:
        name = canonicalize_name(requirement.name)
        if name not in SOURCE_ONLY or (name in node and requirement.specifier.contains(node[name], prereleases=True)):
            continue
        done = pip(["wheel", "--quiet", "--no-deps", "--no-binary", name, "--wheel-dir", str(built), str(requirement)],
                   env={**os.environ, "DS_BUILD_OPS": "0"})
        if done.returncode != 0:
            raise WheelhouseError(f"could not build a wheel of {requirement}:\n{done.stderr.strip()[-2000:]}")
        for wheel in built.glob(f"{name.replace('-', '_')}-*.whl"):
            if not wheel.name.endswith("-py3-none-any.whl"):
                raise WheelhouseError(f"{wheel.name} is not a pure-Python wheel: it would not install on the node")


def resolve(needed: list[Requirement], node: dict[str, str], python: str, built: Path, work: Path) -> list[dict]:
    """pip's resolution for the node: [{"name", "version", "url"}] of what it would install."""
    site = work / "node_site"
    write_stubs(node, site)
    report = work / "report.json"
    env = {**os.environ, "PYTHONPATH": str(site)}
    done = pip(["install", "--dry-run", "--quiet", "--report", str(report), "--find-links", str(built),
                *target_options(python), *map(str, needed)], env=env)
    if done.returncode != 0:
        errors = "\n".join(line for line in done.stderr.splitlines() if "ERROR" in line or "requires" in line)
        raise WheelhouseError(
            f"no complete set of wheels for CPython {python} on manylinux x86_64:\n{errors or done.stderr[-2000:]}"
        )
    install = json.loads(report.read_text())["install"]
    items = [{"name": canonicalize_name(item["metadata"]["name"]), "version": item["metadata"]["version"],
              "url": item["download_info"]["url"]} for item in install]
    if any(item["name"] == "torch" for item in items):
        raise WheelhouseError(f"a package needs another torch than the node's {node['torch']}: "
                              + done.stderr.strip()[-1000:])
    return items


def download(items: list[dict], python: str, built: Path, out: Path) -> None:
    local = [item for item in items if item["url"].startswith("file:") and Path(item["url"][5:]).parent == built]
    for item in local:
        shutil.copy2(item["url"][5:], out)
    remote = [f"{item['name']}=={item['version']}" for item in items if item not in local]
    if remote:
        done = pip(["download", "--quiet", "--no-deps", "--dest", str(out), *target_options(python), *remote])
        if done.returncode != 0:
            raise WheelhouseError(f"download failed:\n{done.stderr.strip()[-2000:]}")


def trim_bitsandbytes(wheel: Path, major: int) -> None:
    """Drop the native libraries of other CUDA majors, ROCm and XPU from the wheel (and from its RECORD)."""
    keep = re.compile(rf"libbitsandbytes_(cpu|cuda{major}\d+)\.so$")
    trimmed = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(trimmed, "w", zipfile.ZIP_DEFLATED) as target:
        dropped = {info.filename for info in source.infolist()
                   if info.filename.endswith(".so") and not keep.search(info.filename)}
        for info in source.infolist():
            if info.filename in dropped:
                continue
            data = source.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                rows = data.decode().splitlines()
                data = ("\n".join(row for row in rows if row.split(",", 1)[0] not in dropped) + "\n").encode()
            target.writestr(info, data)
    trimmed.replace(wheel)


def reason(name: str, node: dict[str, str]) -> str:
    return f"node has {node[name]}" if name in node else "absent on the node"


def write_manifest(out: Path, items: list[dict], node: dict[str, str], args, major: int | None) -> int:
    wheels = {canonicalize_name(path.name.split("-")[0]): path for path in out.glob("*.whl")}
    rows = [{"name": item["name"], "version": item["version"], "wheel": wheels[item["name"]].name,
             "bytes": wheels[item["name"]].stat().st_size, "why": reason(item["name"], node)} for item in items]
    total = sum(row["bytes"] for row in rows)
    manifest = {"target_python": args.target_python, "platform": "manylinux_2_28_x86_64 or older",
                "cuda_major": major, "node_torch": node["torch"], "qlora": args.qlora, "total_bytes": total,
                "wheels": sorted(rows, key=lambda row: row["name"])}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--target-freeze", required=True, type=Path)
    parser.add_argument("--target-python", required=True, help="the node's Python, MAJOR.MINOR (e.g. 3.12)")
    parser.add_argument("--cuda", type=int, help="the node's CUDA major (default: from its torch, e.g. +cu130)")
    parser.add_argument("--no-qlora", dest="qlora", action="store_false", help="ship no bitsandbytes")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"3\.\d+", args.target_python):
        parser.error(f"--target-python must be MAJOR.MINOR such as 3.12, got {args.target_python!r}")
    try:
        total, count = build(args)
    except WheelhouseError as err:
        print(f"make_wheelhouse: {err}", file=sys.stderr)
        return 1
    print(f"{args.out}: {count} wheels, {total / 2**20:.1f} MiB in all (manifest.json lists them)")
    return 0


def build(args) -> tuple[int, int]:
    requirements = REPO / "requirements.txt"
    node = read_freeze(args.target_freeze)
    major = cuda_major(check_node_torch(node, requirements), args.cuda)
    needed = needed_requirements(requirements, node, args.qlora)
    if args.out.exists() and any(args.out.iterdir()):
        raise WheelhouseError(f"--out {args.out} is not empty")
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        built = work / "built"
        built.mkdir()
        build_source_only(needed, node, built)
        items = resolve(needed, node, args.target_python, built, work)
        args.out.mkdir(parents=True, exist_ok=True)
        download(items, args.target_python, built, args.out)
    for wheel in args.out.glob("bitsandbytes-*.whl"):
        if major is not None:
            trim_bitsandbytes(wheel, major)
    return write_manifest(args.out, items, node, args, major), len(items)


if __name__ == "__main__":
    raise SystemExit(main())
