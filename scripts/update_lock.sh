#!/usr/bin/env bash
# Re-resolve the lock files to the newest versions that requirements.txt allows, then run the test suite on
# them (scripts/test.sh installs the lock of its Python into .venv). Needs the package index; runs on Python 3.11+.
#
#   scripts/update_lock.sh            # rewrite requirements/lock-py3.X-{cpu,cuda}.txt, then scripts/test.sh
#   scripts/update_lock.sh --no-test  # only rewrite the lock files
#
# Every lock is for Linux x86_64 (glibc 2.28+) and one Python (scripts/locks.py: PYTHONS, 3.11 to 3.13),
# resolved by uv for that Python whichever Python runs this; scripts/locks.py describes the format (each pin
# names the wheel chosen). lock-*-cuda.txt holds torch from PyPI (CUDA) with its nvidia-* libraries;
# lock-*-cpu.txt the same torch version's CPU build (PyTorch's CPU index, or a local wheel where pip's
# find-links has one) and none of the packages only the CUDA build requires: the CPU build's requirements are
# read from its metadata, and the CUDA build's own are left out of the resolution. Nothing is installed but
# pip and uv in a temporary folder.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_TESTS=1
case "${1:-}" in
    "") ;;
    --no-test) RUN_TESTS=0 ;;
    *) echo "usage: scripts/update_lock.sh [--no-test]" >&2; exit 2 ;;
esac
CPU_INDEX=https://download.pytorch.org/whl/cpu
UV_VERSION=0.13.10
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

source scripts/resolver_env.sh
resolver="$(make_resolver "$work/resolver")"
if ! "$resolver" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "scripts/update_lock.sh needs Python 3.11 or newer to run (PYTHON=python3.11 scripts/update_lock.sh)" >&2
    exit 2
fi
"$resolver" -m pip install --quiet "uv==$UV_VERSION" packaging
uv="$work/resolver/bin/uv"
locks() { "$resolver" scripts/locks.py "$@"; }
read -r -a PYTHONS < <(locks pythons)

# compile PYTHON PYLOCK [UV_ARGS...]: the resolution of requirements.txt for PYTHON, as a pylock.toml (PyPI only)
compile() {
    local python="$1" pylock="$2"
    shift 2
    "$uv" pip compile requirements.txt --quiet --no-config --python-version "$python" \
        --python-platform x86_64-manylinux_2_28 --format pylock.toml -o "$pylock" "$@"
}
# torch_report PYTHON VERSION REPORT [PIP_ARGS...]: pip's dry-run report of torch==VERSION's wheel for PYTHON
torch_report() {
    local python="$1" version="$2" report="$3"
    shift 3
    "$resolver" -m pip install --quiet --dry-run --ignore-installed --no-deps --only-binary=:all: \
        --python-version "$python" --platform manylinux_2_28_x86_64 --target "$work/target" \
        --report "$report" "torch==$version" "$@"
}
# cpu_torch PYTHON VERSION REPORT: the CPU build from a local wheel (pip's find-links), else PyTorch's CPU index
cpu_torch() {
    torch_report "$@" --no-index 2>/dev/null \
        || { [ "$cpu_index_reachable" = 1 ] && torch_report "$@" --index-url "$CPU_INDEX" --timeout 30; }
}
cpu_index_reachable=0
if "$resolver" -c "import urllib.request; urllib.request.urlopen('$CPU_INDEX/torch/', timeout=15)" 2>/dev/null; then
    cpu_index_reachable=1
fi
date="$(date -u +%Y-%m-%d)"
header() {
    printf 'Exact versions for Python %s, Linux x86_64 (glibc 2.28+), %s.\nWritten by scripts/update_lock.sh from requirements.txt on %s; installed by scripts/setup_env.sh.' "$1" "$2" "$date"
}

# torch's version in range, and the requirements only its CUDA build has (uv overrides drop them)
compile 3.11 "$work/pylock.probe.toml"
torch_version="$(locks version "$work/pylock.probe.toml" torch)"
# PyPI's build only: pip's configuration and find-links could offer a local CPU build, which ==VERSION accepts
PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS="" torch_report 3.11 "$torch_version" "$work/torch-cuda.json"
if ! cpu_torch 3.11 "${torch_version}+cpu" "$work/torch-cpu.json"; then
    echo "update_lock: no CPU build of torch $torch_version: neither a local wheel (pip's find-links) nor $CPU_INDEX" >&2
    exit 1
fi
locks overrides "$work/torch-cuda.json" "$work/torch-cpu.json" > "$work/cpu-overrides.txt"
if [ ! -s "$work/cpu-overrides.txt" ]; then
    echo "update_lock: torch $torch_version's PyPI and CPU builds require the same packages: the CPU lock would hold the CUDA libraries" >&2
    exit 1
fi

# every Python at once: the resolutions wait on the index, not on the processor
mkdir -p requirements
for python in "${PYTHONS[@]}"; do
    compile "$python" "$work/pylock.cuda${python/./}.toml" &  # uv wants no dot in the name
    compile "$python" "$work/pylock.cpu${python/./}.toml" --overrides "$work/cpu-overrides.txt" &
done
wait
for python in "${PYTHONS[@]}"; do
    tag="cp${python/./}"
    [ -s "$work/pylock.cuda${python/./}.toml" ] && [ -s "$work/pylock.cpu${python/./}.toml" ] \
        || { echo "update_lock: the resolution for Python $python failed (above)" >&2; exit 1; }
    locks write "$work/pylock.cuda${python/./}.toml" "requirements/lock-py$python-cuda.txt" \
        "$(header "$python" "CUDA torch from PyPI")"
    if cpu_torch "$python" "${torch_version}+cpu" "$work/cpu$python.json"; then
        cpu_file="$("$resolver" -c 'import json, sys, urllib.parse
print(urllib.parse.unquote(json.load(open(sys.argv[1]))["install"][0]["download_info"]["url"].rsplit("/", 1)[-1]))' "$work/cpu$python.json")"
    else  # PyTorch's CPU index publishes this file for every Python torch supports; it could not be seen from here
        cpu_file="torch-${torch_version}+cpu-$tag-$tag-manylinux_2_28_x86_64.whl"
        echo "update_lock: $cpu_file (Python $python) named by PyTorch's rule: neither a local wheel nor $CPU_INDEX" >&2
    fi
    locks write "$work/pylock.cpu${python/./}.toml" "requirements/lock-py$python-cpu.txt" \
        "$(header "$python" "CPU torch (PyTorch's CPU build)")" --cpu-torch "${torch_version}+cpu" --cpu-torch-file "$cpu_file"
done
rm -f requirements/lock-cpu.txt requirements/lock-cuda.txt  # the Python 3.11 locks before there was one per Python

if [ "$RUN_TESTS" = 1 ]; then
    scripts/test.sh
fi
