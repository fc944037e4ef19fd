#!/usr/bin/env bash
# Create .venv (once) and install the project's dependencies into it. torch comes first: the CUDA build from
# PyPI where an NVIDIA GPU is present; otherwise the CPU build, from a local wheel when pip is configured with
# one (find-links), else from PyTorch's CPU index. requirements.txt then finds torch already satisfied.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
PYTHON="${PYTHON:-python3}"

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
pip() { .venv/bin/python -m pip "$@"; }

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        pip install --quiet "torch==${TORCH_VERSION}"
    elif pip install --quiet --no-deps --no-index "torch==${TORCH_VERSION}" 2>/dev/null; then
        pip install --quiet "torch==${TORCH_VERSION}"  # its dependencies, from the usual index
    else
        pip install --quiet "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu
    fi
fi
pip install --quiet -r requirements.txt
