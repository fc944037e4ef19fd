#!/usr/bin/env bash
# The test command (CI runs exactly this): set up .venv, lint, then the whole pytest suite except tests
# marked slow or gpu. Extra arguments go to pytest, e.g. `scripts/test.sh -m slow` or `-k docvqa`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh
.venv/bin/ruff check .
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ "$#" -eq 0 ]; then
    set -- -m "not slow and not gpu"
fi
.venv/bin/python -m pytest "$@"
