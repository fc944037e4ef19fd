#!/usr/bin/env bash
# Create .venv (once) and install the project's dependencies into it: torch first, the CUDA build where an
# NVIDIA GPU is present, otherwise the CPU build (a local wheel if pip knows one, else PyTorch's CPU index).
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
PYTHON="${PYTHON:-python3}"

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
pip() { .venv/bin/python -m pip "$@"; }
pip install --quiet --upgrade pip

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        pip install --quiet "torch==${TORCH_VERSION}"
    else
        pip install --quiet --no-index "torch==${TORCH_VERSION}" 2>/dev/null \
            || pip install --quiet "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu
    fi
fi
pip install --quiet -r requirements.txt
