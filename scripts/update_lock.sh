#!/usr/bin/env bash
# Re-resolve the lock files to the newest versions that requirements.txt allows, then run the test suite on
# them (scripts/test.sh installs the lock into .venv). Needs the package index.
#
#   scripts/update_lock.sh            # rewrite requirements/lock-cpu.txt and lock-cuda.txt, then scripts/test.sh
#   scripts/update_lock.sh --no-test  # only rewrite the lock files
#
# Both locks are for Python 3.11 on Linux x86_64 (the platform of scripts/setup_env.sh). lock-cuda.txt holds
# torch from PyPI (CUDA) with its nvidia-* libraries; lock-cpu.txt holds the same torch version's CPU build
# (PyTorch's CPU index, or a local wheel where pip's find-links has one) and none of the CUDA libraries.
# The resolution reads package metadata (and builds it for a source-only package such as deepspeed); nothing
# is installed but a recent pip in a temporary folder.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_TESTS=1
case "${1:-}" in
    "") ;;
    --no-test) RUN_TESTS=0 ;;
    *) echo "usage: scripts/update_lock.sh [--no-test]" >&2; exit 2 ;;
esac
CPU_INDEX=https://download.pytorch.org/whl/cpu
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

source scripts/resolver_env.sh
resolver="$(make_resolver "$work/resolver")"
if [ "$("$resolver" -c 'import platform, sys; print(sys.platform, platform.machine(), *sys.version_info[:2])')" != "linux x86_64 3 11" ]; then
    echo "scripts/update_lock.sh resolves for the platform it runs on: run it on Linux x86_64 with Python 3.11" >&2
    exit 2
fi

# resolve LOCK_FILE HEADER PIP_ARGS...: write every package of the resolution as NAME==VERSION, sorted.
# pip's configuration files are left out (a local torch wheel found through them would shadow the index's).
resolve() {
    local lock="$1" header="$2"
    shift 2
    PIP_CONFIG_FILE=/dev/null "$resolver" -m pip install --quiet --dry-run --ignore-installed --report "$work/report.json" \
        --prefer-binary "$@" -r requirements.txt
    "$resolver" - "$work/report.json" "$lock" "$header" <<'PY'
import json, sys
report, lock, header = sys.argv[1:]
pins = sorted((item["metadata"]["name"], item["metadata"]["version"]) for item in json.load(open(report))["install"])
lines = [f"# {line}" for line in header.splitlines()] + [f"{name}=={version}" for name, version in pins]
open(lock, "w").write("\n".join(lines) + "\n")
print(f"{lock}: {len(pins)} packages")
PY
}

mkdir -p requirements
PIP_FIND_LINKS="" resolve requirements/lock-cuda.txt "Exact versions for Python 3.11, Linux x86_64, CUDA torch from PyPI.
Written by scripts/update_lock.sh from requirements.txt on $(date -u +%Y-%m-%d); installed by scripts/setup_env.sh."
torch_version=$(sed -n 's/^torch==\([^+]*\).*/\1/p' requirements/lock-cuda.txt)
cpu_source=()
if ! PIP_CONFIG_FILE=/dev/null "$resolver" -m pip download --quiet --no-deps --no-index -d "$work/probe" "torch==${torch_version}+cpu" 2>/dev/null; then
    cpu_source=(--extra-index-url "$CPU_INDEX")  # no local CPU wheel: PyTorch's CPU index
fi
resolve requirements/lock-cpu.txt "Exact versions for Python 3.11, Linux x86_64, CPU torch (PyTorch's CPU build).
Written by scripts/update_lock.sh from requirements.txt on $(date -u +%Y-%m-%d); installed by scripts/setup_env.sh." \
    "torch==${torch_version}+cpu" "${cpu_source[@]}"

if [ "$RUN_TESTS" = 1 ]; then
    scripts/test.sh
fi
