#!/usr/bin/env bash
# On a machine with the package index: the wheels an offline GPU node needs to run scripts/gpu_check.sh with
# its own Python and CUDA torch.
#
#   scripts/make_wheelhouse.sh --out DIR --target-freeze FILE --target-python 3.12 [--cuda 13] [--no-qlora]
#
# FILE is `python -m pip freeze` run on the node. DIR gets, for that Python on manylinux x86_64, a wheel of
# every package the project needs that the node lacks or has out of the range of requirements.txt, with their
# missing dependencies (never torch, ruff or av), bitsandbytes trimmed to the node's CUDA major (--cuda, else
# read from the node's torch, e.g. 2.11.0+cu130), and manifest.json (each wheel, its size and why it is
# there). Prints the total size; fails with pip's reason when a needed package has no such wheel.
# Copy DIR next to the repository and run scripts/gpu_check.sh --python ... --wheelhouse DIR on the node.
set -euo pipefail
cd "$(dirname "$0")/.."
# pip evaluates dependency markers (python_version < "3.12", ...) with the Python it runs on: resolve with the
# node's Python version where this machine has it (PYTHON=... chooses another).
previous=""
for argument in "$@"; do
    if [ "$previous" = --target-python ] && [ -z "${PYTHON:-}" ] && "python$argument" -c "" >/dev/null 2>&1; then
        export PYTHON="python$argument"
    fi
    previous="$argument"
done
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
source scripts/resolver_env.sh
resolver="$(make_resolver "$work/resolver")"
# packaging beside the resolver, not in it: the resolver's own packages would count as present on the node
"$resolver" -m pip install --quiet --target "$work/tools" packaging
PYTHONPATH="$work/tools" "$resolver" scripts/wheelhouse.py "$@"
