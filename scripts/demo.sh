#!/usr/bin/env bash
# The demo: set up .venv, then train a tiny Phi-3-V on a synthetic UCF-style video set (offline, CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python demo.py "$@"
