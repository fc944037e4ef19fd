#!/usr/bin/env bash
# Create .venv (once) and install the project's dependencies into it, at the exact versions of the lock file:
# requirements/lock-cuda.txt where an NVIDIA GPU is present, requirements/lock-cpu.txt otherwise (torch's CPU
# build: from a local wheel when pip is configured with one (find-links), else from PyTorch's CPU index).
# The locks are for Python 3.11 on Linux x86_64; elsewhere, or with TORCH_VERSION=... (another torch), or with
# REQUIREMENTS=ranges, the compatible ranges of requirements.txt are installed instead.
# scripts/update_lock.sh re-resolves the locks to the newest versions in range.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
CPU_INDEX=https://download.pytorch.org/whl/cpu

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
pip() { .venv/bin/python -m pip "$@"; }

GPU=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then GPU=1; fi
if [ "$GPU" = 1 ]; then
    LOCK=requirements/lock-cuda.txt
else
    LOCK=requirements/lock-cpu.txt
fi
platform="$(.venv/bin/python -c 'import platform, sys; print(sys.platform, platform.machine(), *sys.version_info[:2])')"
if [ -n "${TORCH_VERSION:-}" ] || [ "${REQUIREMENTS:-lock}" = ranges ] || [ "$platform" != "linux x86_64 3 11" ]; then
    echo "setup_env: installing the ranges of requirements.txt, not $LOCK (Python/platform: $platform)" >&2
    LOCK=""
fi
if [ -n "$LOCK" ]; then
    TORCH_VERSION="$(sed -n 's/^torch==//p' "$LOCK")"
else
    TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
fi

# torch first, on its own: its CPU build may need the local wheel or PyTorch's CPU index
if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__ != '${TORCH_VERSION}')" 2>/dev/null; then
    if [ "$GPU" = 1 ] && [[ "$TORCH_VERSION" != *+cpu ]]; then
        pip install --quiet "torch==${TORCH_VERSION}" ${LOCK:+-c "$LOCK"}
    else
        cpu_version="${TORCH_VERSION%+cpu}+cpu"
        if ! pip install --quiet --no-deps --no-index "torch==${cpu_version}" 2>/dev/null; then
            pip install --quiet --no-deps "torch==${cpu_version}" --index-url "$CPU_INDEX"
        fi
    fi
fi
if [ -n "$LOCK" ]; then
    pip install --quiet -r "$LOCK"
else
    pip install --quiet -r requirements.txt
fi
