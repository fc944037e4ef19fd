#!/usr/bin/env bash
# The test command (CI runs exactly this): set up .venv and the page tests' browser, lint, then the pytest suite without the tests marked
# slow or gpu. Arguments go to pytest, e.g. `scripts/test.sh -k docvqa` or `scripts/test.sh -m slow`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh
scripts/setup_browser.sh
.venv/bin/ruff check .
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
marker=(-m "not slow and not gpu")
for argument in "$@"; do
    if [[ "$argument" == -m* ]]; then
        marker=()
    fi
done
.venv/bin/python -m pytest "${marker[@]}" "$@"
