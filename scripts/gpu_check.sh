#!/usr/bin/env bash
# One prepared GPU check, in <= 8 minutes on one H100/H200 with nothing but this repository and the package
# index: set up the environment (CUDA torch, the project's requirements with bitsandbytes, a flash-attn wheel
# if one installs), run the GPU tests (`pytest -m gpu`), run a short benchmark (full-size model with random
# weights at the recipe's DocVQA shape, a few steps per strategy), and write one report:
# OUT/gpu_check.json and OUT/gpu_check.md (device, versions, set-up, pass/fail per test, img/s, MFU, peak memory).
#
#   scripts/gpu_check.sh                 # on the GPU machine; OUT defaults to output/gpu_check
#   scripts/gpu_check.sh --dry-run       # CPU: the existing .venv, the GPU tests (they skip), a tiny benchmark
#   scripts/gpu_check.sh --out DIR
#
# Environment: FLASH_ATTN_WHEEL=path-or-URL of a flash-attn wheel to try before the package index;
# GPU_CHECK_BUDGET=seconds for the whole check (default 480). Each stage gets what is left of the budget, so a
# slow set-up shortens the benchmark (its unfinished configurations are reported as timed out), never the report.
set -uo pipefail
cd "$(dirname "$0")/.."

MODE=gpu
OUT=output/gpu_check
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) MODE=dry-run ;;
        --out) OUT="$2"; shift ;;
        *) echo "usage: scripts/gpu_check.sh [--dry-run] [--out DIR]" >&2; exit 2 ;;
    esac
    shift
done
BUDGET="${GPU_CHECK_BUDGET:-480}"
START=$(date +%s)
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
STEPS=()
PY=.venv/bin/python

elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( BUDGET - $(elapsed) )); }
say() { echo "[gpu_check $(elapsed)s] $*"; }
# record NAME STATUS STEP_START [DETAIL]
record() { STEPS+=("--step" "$1=$2:$(( $(date +%s) - $3 ))${4:+:$4}"); }

write_report() {
    if [ -x "$PY" ]; then
        "$PY" -m benchmarks.gpu_check --out "$OUT" --mode "$MODE" "${STEPS[@]}"
    else
        echo "no Python environment: no report" >&2
    fi
}
trap write_report EXIT

# ---- 1. environment ------------------------------------------------------------------------------------
step=$(date +%s)
if [ "$MODE" = dry-run ]; then
    if "$PY" -c "import torch, transformers" 2>/dev/null; then record environment ok "$step" "dry run: existing .venv"
    else record environment failed "$step" "dry run needs an existing .venv (scripts/setup_env.sh)"; exit 1; fi
else
    say "setting up .venv (CUDA torch, requirements) -> $OUT/setup.log"
    if [ -L .venv ] && [ ! -e .venv ]; then rm .venv; fi  # a dangling link (a worktree's shared environment)
    if timeout "$(left)" scripts/setup_env.sh >"$OUT/setup.log" 2>&1 \
        && "$PY" -c "import torch, bitsandbytes; assert torch.cuda.is_available(), 'torch sees no CUDA GPU'" >>"$OUT/setup.log" 2>&1; then
        record environment ok "$step" "torch $("$PY" -c 'import torch; print(torch.__version__)')"
    else
        record environment failed "$step" "see setup.log: $(tail -n 1 "$OUT/setup.log" | tr ':|' '  ' | cut -c1-200)"
        exit 1
    fi
    step=$(date +%s)
    say "flash-attn: a prebuilt wheel only (a source build takes far longer than this check) -> $OUT/flash_attn.log"
    flash_sources=()
    [ -n "${FLASH_ATTN_WHEEL:-}" ] && flash_sources+=("$FLASH_ATTN_WHEEL")
    flash_sources+=("flash-attn")
    flash=missing
    for source in "${flash_sources[@]}"; do
        if timeout 180 "$PY" -m pip install --only-binary=:all: --no-deps "$source" >>"$OUT/flash_attn.log" 2>&1 \
            && "$PY" -c "from transformers.utils import is_flash_attn_2_available as a; assert a()" >>"$OUT/flash_attn.log" 2>&1; then
            flash=ok; break
        fi
    done
    if [ "$flash" = ok ]; then record flash-attn ok "$step" "$("$PY" -c 'import flash_attn; print(flash_attn.__version__)')"
    else record flash-attn "not installed" "$step" "no flash-attn wheel installed for this platform: flash tests skip, benchmark uses SDPA"; fi
fi

# ---- 2. GPU tests -----------------------------------------------------------------------------------------
step=$(date +%s)
say "GPU tests (pytest -m gpu) -> $OUT/gpu_tests.log"
test_budget=$(( $(left) * 40 / 100 ))
[ "$test_budget" -gt 150 ] && test_budget=150
[ "$MODE" = dry-run ] && test_budget=$(( $(left) / 2 ))
HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false timeout "$test_budget" "$PY" -m pytest -m gpu tests/test_gpu.py \
    -p no:cacheprovider -q -rA --junitxml "$OUT/gpu_tests.xml" >"$OUT/gpu_tests.log" 2>&1
status=$?
case $status in
    0) record gpu-tests ok "$step" ;;
    124) record gpu-tests "timed out" "$step" "after ${test_budget}s" ;;
    *) record gpu-tests failed "$step" "pytest exit $status" ;;
esac

# ---- 3. benchmark -----------------------------------------------------------------------------------------
step=$(date +%s)
bench_budget=$(( $(left) - 20 ))  # keep time for the report
say "benchmark -> $OUT/benchmark (budget ${bench_budget}s)"
if [ "$MODE" = dry-run ]; then
    bench=(--tiny --num_crops 1 --batch_size 1 --strategies lora --flash off --steps 1 --warmup_steps 1
           --dataloader_num_workers 0 --data_samples 1 --num_pages 1)
else
    # 4 strategies share the budget (after ~60 s writing the random checkpoint); a configuration past its
    # share is stopped and reported as timed out
    bench=(--random_init --strategies full,frozen,lora,qlora --flash auto --batch_size 8 --steps 2
           --warmup_steps 1 --data_samples 2 --num_pages 2 --config_timeout $(( (bench_budget - 60) / 4 )))
fi
HF_HUB_OFFLINE=1 timeout "$bench_budget" "$PY" benchmark.py "${bench[@]}" --output_dir "$OUT/benchmark" \
    --cache_dir "$OUT/cache" >"$OUT/benchmark.log" 2>&1
status=$?
case $status in
    0) record benchmark ok "$step" ;;
    124) record benchmark "timed out" "$step" "after ${bench_budget}s (rows so far are in the report)" ;;
    *) record benchmark failed "$step" "exit $status, see benchmark.log" ;;
esac
[ "$MODE" = gpu ] && rm -rf "$OUT/cache"  # the 8 GB random checkpoint
say "done"
