#!/usr/bin/env bash
# Create .venv (once) and install the project's dependencies into it, at the exact versions of the lock for the
# running Python: requirements/lock-py3.X-cuda.txt where an NVIDIA GPU is present, requirements/lock-py3.X-cpu.txt
# otherwise (torch's CPU build: from a local wheel when pip is configured with one (find-links), else from
# PyTorch's CPU index). Locks exist for Python 3.11 to 3.13 on Linux x86_64; elsewhere, or with TORCH_VERSION=...
# (another torch), or with REQUIREMENTS=ranges, the compatible ranges of requirements.txt are installed instead.
# A .venv reused on another kind of node gets the torch build of this one (a CPU build is replaced on a GPU node).
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
build=cpu
if [ "$GPU" = 1 ]; then build=cuda; fi
read -r system machine python_version < <(.venv/bin/python -c \
    'import platform, sys; print(sys.platform, platform.machine(), "%d.%d" % sys.version_info[:2])')
LOCK="requirements/lock-py${python_version}-${build}.txt"
if [ -n "${TORCH_VERSION:-}" ] || [ "${REQUIREMENTS:-lock}" = ranges ] || [ "$system $machine" != "linux x86_64" ] \
        || [ ! -f "$LOCK" ]; then
    echo "setup_env: installing the ranges of requirements.txt, not $LOCK (Python/platform: $python_version $system $machine)" >&2
    LOCK=""
fi
if [ -n "$LOCK" ]; then
    TORCH_VERSION="$(sed -n 's/^torch==\([^ ]*\).*/\1/p' "$LOCK")"
else
    TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
fi

# torch first, on its own: the CUDA build on a GPU node, the CPU build (a local wheel or PyTorch's CPU index)
# elsewhere, unless TORCH_VERSION asks for a +cpu build
if [ "$GPU" = 1 ] && [[ "$TORCH_VERSION" != *+cpu ]]; then
    wanted="$TORCH_VERSION"
else
    wanted="${TORCH_VERSION%+cpu}+cpu"
fi
installed="$(.venv/bin/python -c 'import torch; print(torch.__version__)' 2>/dev/null || true)"
if [ "$installed" != "$wanted" ]; then
    if [[ "$wanted" != *+cpu ]]; then
        # pip counts a CPU build (2.13.0+cpu) as satisfying ==2.13.0 and would keep it: a .venv made on a CPU node
        # and reused on a GPU node would never use the GPU
        if [[ "$installed" == *+cpu ]]; then
            echo "setup_env: replacing the CPU build of torch ($installed) with the CUDA build ($wanted)" >&2
            pip uninstall --quiet --yes torch
        fi
        pip install --quiet "torch==${wanted}" ${LOCK:+-c "$LOCK"}
    elif ! pip install --quiet --no-deps --no-index "torch==${wanted}" 2>/dev/null; then
        pip install --quiet --no-deps "torch==${wanted}" --index-url "$CPU_INDEX"
    fi
fi
# The rest once per set of requirements: a .venv that already holds them is left as it is (no pip run, nothing
# printed); a changed lock or torch build installs again. Delete .venv/.installed to force a reinstall.
requirements="${LOCK:-requirements.txt}"
fingerprint="$wanted $(sha256sum "$requirements" | cut -d' ' -f1)"
if [ "$(cat .venv/.installed 2>/dev/null)" != "$fingerprint" ]; then
    pip install --quiet -r "$requirements"
    echo "$fingerprint" > .venv/.installed
fi
