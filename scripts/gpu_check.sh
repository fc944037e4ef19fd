#!/usr/bin/env bash
# One prepared GPU check, in <= 8 minutes on one H100/H200: set up the environment, run the GPU tests
# (`pytest -m gpu`), run a short benchmark (full-size model with random weights at the recipe's DocVQA shape, a
# few steps per strategy), and write the report: OUT/gpu_check.json, OUT/gpu_check.md (device, versions, the
# SDPA kernel torch picks for the benchmark's shapes, set-up, pass/fail per test, img/s, MFU, peak memory) and
# OUT/gpu_check_logs.tar.gz (every log). Working files (the installed wheelhouse, the benchmark's random
# checkpoint) go to OUT.work beside OUT.
#
#   scripts/gpu_check.sh [--out DIR] [--budget SECONDS]      # GPU machine with the package index: a fresh .venv
#   scripts/gpu_check.sh --python PATH --wheelhouse DIR ...   # offline node whose Python has CUDA torch
#   scripts/gpu_check.sh --dry-run [...]                      # CPU: the GPU tests skip, a tiny benchmark
#
# With --python, that Python and its torch run everything; the wheelhouse (scripts/make_wheelhouse.sh) is
# installed with --no-index into OUT.work/site, put on PYTHONPATH for every child process, and the Python's
# own site-packages are left as they are (bytecode caches go to OUT.work too). Without --python, .venv is set
# up by scripts/setup_env.sh (CUDA torch, the lock) plus a flash-attn wheel if one installs; a dry run uses the
# existing .venv.
#
# Environment: FLASH_ATTN_WHEEL=path-or-URL of a flash-attn wheel to try before the package index (without
# --python). The budget (default 480 s, or GPU_CHECK_BUDGET) covers everything; each stage gets what is left,
# so a slow set-up shortens the benchmark (its unfinished configurations are reported as timed out), never the
# report.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO="$(pwd)"

usage() {
    echo "usage: scripts/gpu_check.sh [--python PATH --wheelhouse DIR] [--out DIR] [--budget SECONDS] [--dry-run]" >&2
    exit 2
}
MODE=gpu
OUT=output/gpu_check
NODE_PYTHON=""
WHEELHOUSE=""
BUDGET="${GPU_CHECK_BUDGET:-480}"
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) MODE=dry-run ;;
        --out) [ $# -ge 2 ] || usage; OUT="$2"; shift ;;
        --python) [ $# -ge 2 ] || usage; NODE_PYTHON="$2"; shift ;;
        --wheelhouse) [ $# -ge 2 ] || usage; WHEELHOUSE="$2"; shift ;;
        --budget) [ $# -ge 2 ] || usage; BUDGET="$2"; shift ;;
        *) usage ;;
    esac
    shift
done
[[ "$BUDGET" =~ ^[0-9]+$ ]] || { echo "gpu_check: --budget must be a number of seconds, got '$BUDGET'" >&2; exit 2; }
if [ -n "$NODE_PYTHON" ] && [ ! -x "$NODE_PYTHON" ]; then
    echo "gpu_check: --python $NODE_PYTHON is not an executable" >&2; exit 2
fi
if [ -n "$WHEELHOUSE" ] && [ -z "$NODE_PYTHON" ]; then echo "gpu_check: --wheelhouse goes with --python" >&2; exit 2; fi
if [ -n "$NODE_PYTHON" ] && { [ -z "$WHEELHOUSE" ] || [ ! -f "$WHEELHOUSE/manifest.json" ]; }; then
    echo "gpu_check: --python needs --wheelhouse DIR made by scripts/make_wheelhouse.sh (with its manifest.json)" >&2
    exit 2
fi
START=$(date +%s)
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
WORK="$OUT.work"
LOGS="$WORK/logs"
# nothing from an earlier run: the report reads what is there (a stage that does not run this time must not lend it
# an earlier run's figures)
rm -rf "$LOGS" "$WORK/benchmark" "$WORK/batching" "$WORK/gpu_tests.xml" && mkdir -p "$LOGS"
STEPS=()
PY="${NODE_PYTHON:-.venv/bin/python}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( BUDGET - $(elapsed) )); }
say() { echo "[gpu_check $(elapsed)s] $*"; }
# record NAME STATUS STEP_START [DETAIL]
record() { STEPS+=("--step" "$1=$2:$(( $(date +%s) - $3 ))${4:+:$4}"); }
last_line() { tail -n 1 "$1" | tr ':|' '  ' | cut -c1-200; }
# within SECONDS COMMAND...: COMMAND under `timeout SECONDS`. A budget already spent (under 1 s) runs nothing and
# reports a timeout (124): `timeout 0` would mean no limit at all, and a negative one is an error.
within() {
    local seconds=$1
    shift
    [ "$seconds" -ge 1 ] || return 124
    timeout "$seconds" "$@"
}

write_report() {
    if "$PY" -c "import torch" 2>/dev/null; then
        "$PY" -m benchmarks.gpu_check --out "$OUT" --work "$WORK" --mode "$MODE" "${STEPS[@]}"
    else
        echo "no Python with torch: no report" >&2
    fi
    # every log, the test results and the benchmark's report and per-configuration logs (not its run folders)
    tar -czf "$OUT/gpu_check_logs.tar.gz" -C "$WORK" --exclude=benchmark/runs \
        $(cd "$WORK" && ls -d logs gpu_tests.xml benchmark batching 2>/dev/null)
}
trap write_report EXIT

# ---- 1. environment ------------------------------------------------------------------------------------
# node_environment: the node's Python and torch, the wheelhouse in a folder of its own
node_environment() {
    local step site="$WORK/site"
    step=$(date +%s)
    export PYTHONPYCACHEPREFIX="$WORK/pycache"
    if ! "$PY" -c "import torch" >"$LOGS/setup.log" 2>&1; then
        record environment failed "$step" "$PY cannot import torch: $(last_line "$LOGS/setup.log")"; exit 1
    fi
    say "installing the wheelhouse into $site (--no-index) -> logs/setup.log"
    rm -rf "$site"
    if ! "$PY" -m pip install --no-index --no-deps --no-compile --disable-pip-version-check --target "$site" \
        "$WHEELHOUSE"/*.whl >>"$LOGS/setup.log" 2>&1; then
        record environment failed "$step" "pip install --no-index of the wheelhouse: $(last_line "$LOGS/setup.log")"
        exit 1
    fi
    export PYTHONPATH="$REPO:$site${PYTHONPATH:+:$PYTHONPATH}"
    export PATH="$site/bin:$PATH"  # the wheels' commands, e.g. ninja for DeepSpeed's run-time op builds
    local probe="import torch, transformers, peft, accelerate, datasets, deepspeed"
    [ "$MODE" = gpu ] && probe="$probe; assert torch.cuda.is_available(), 'torch sees no CUDA GPU'"
    if "$PY" -c "$probe" >>"$LOGS/setup.log" 2>&1; then
        record environment ok "$step" "$PY, torch $("$PY" -c 'import torch; print(torch.__version__)'), wheelhouse $(ls "$WHEELHOUSE"/*.whl | wc -l) wheels"
    else
        record environment failed "$step" "see setup.log: $(last_line "$LOGS/setup.log")"; exit 1
    fi
}

# venv_environment: .venv from scripts/setup_env.sh, then a flash-attn wheel if one installs
venv_environment() {
    local step
    step=$(date +%s)
    say "setting up .venv (CUDA torch, the lock) -> logs/setup.log"
    if [ -L .venv ] && [ ! -e .venv ]; then rm .venv; fi  # a dangling link (a worktree's shared environment)
    if within "$(left)" scripts/setup_env.sh >"$LOGS/setup.log" 2>&1 \
        && "$PY" -c "import torch, bitsandbytes; assert torch.cuda.is_available(), 'torch sees no CUDA GPU'" >>"$LOGS/setup.log" 2>&1; then
        record environment ok "$step" "torch $("$PY" -c 'import torch; print(torch.__version__)')"
    else
        record environment failed "$step" "see setup.log: $(last_line "$LOGS/setup.log")"
        exit 1
    fi
    step=$(date +%s)
    say "flash-attn: a prebuilt wheel only (a source build takes far longer than this check) -> logs/flash_attn.log"
    local flash_sources=() flash=missing source
    [ -n "${FLASH_ATTN_WHEEL:-}" ] && flash_sources+=("$FLASH_ATTN_WHEEL")
    flash_sources+=("flash-attn")
    for source in "${flash_sources[@]}"; do
        if timeout 180 "$PY" -m pip install --only-binary=:all: --no-deps "$source" >>"$LOGS/flash_attn.log" 2>&1 \
            && "$PY" -c "from transformers.utils import is_flash_attn_2_available as a; assert a()" >>"$LOGS/flash_attn.log" 2>&1; then
            flash=ok; break
        fi
    done
    if [ "$flash" = ok ]; then record flash-attn ok "$step" "$("$PY" -c 'import flash_attn; print(flash_attn.__version__)')"
    else record flash-attn "not installed" "$step" "no flash-attn wheel installed for this platform: flash tests skip, benchmark uses SDPA"; fi
}

if [ -n "$NODE_PYTHON" ]; then
    node_environment
elif [ "$MODE" = dry-run ]; then
    step=$(date +%s)
    if "$PY" -c "import torch, transformers" 2>/dev/null; then record environment ok "$step" "dry run: existing .venv"
    else record environment failed "$step" "dry run needs an existing .venv (scripts/setup_env.sh)"; exit 1; fi
else
    venv_environment
fi
if [ -n "$NODE_PYTHON" ]; then
    if flash_version="$("$PY" -c 'import flash_attn; print(flash_attn.__version__)' 2>/dev/null)"; then
        record flash-attn ok "$(date +%s)" "$flash_version (the node's)"
    else
        record flash-attn "not installed" "$(date +%s)" "not on the node: flash tests skip, benchmark uses SDPA"
    fi
fi

# ---- 2. GPU tests -----------------------------------------------------------------------------------------
step=$(date +%s)
say "GPU tests (pytest -m gpu) -> logs/gpu_tests.log"
test_budget=$(( $(left) * 40 / 100 ))
[ "$test_budget" -gt 150 ] && test_budget=150
[ "$MODE" = dry-run ] && test_budget=$(( $(left) / 2 ))
within "$test_budget" "$PY" -m pytest -m gpu tests/test_gpu.py -p no:cacheprovider -q -rA \
    --junitxml "$WORK/gpu_tests.xml" >"$LOGS/gpu_tests.log" 2>&1
status=$?
case $status in
    0) record gpu-tests ok "$step" ;;
    124) record gpu-tests "timed out" "$step" "after ${test_budget}s" ;;
    *) record gpu-tests failed "$step" "pytest exit $status" ;;
esac

# run_benchmark NAME BUDGET STEP_START TIMED_OUT_DETAIL ARGS...: benchmark.py ARGS into WORK/NAME, logged to
# logs/NAME.log and recorded as the step NAME
run_benchmark() {
    local name=$1 budget=$2 started=$3 timed_out=$4 status
    shift 4
    within "$budget" "$PY" benchmark.py "$@" --output_dir "$WORK/$name" --cache_dir "$WORK/cache" \
        >"$LOGS/$name.log" 2>&1
    status=$?
    case $status in
        0) record "$name" ok "$started" ;;
        124) record "$name" "timed out" "$started" "$timed_out" ;;
        *) record "$name" failed "$started" "exit $status, see $name.log" ;;
    esac
}

# ---- 3. benchmark -----------------------------------------------------------------------------------------
step=$(date +%s)
bench_budget=$(( ($(left) - 20) * 70 / 100 ))  # the rest: padded vs packed batches, then the report
say "benchmark -> logs/benchmark.log (budget ${bench_budget}s)"
if [ "$MODE" = dry-run ]; then
    bench=(--tiny --num_crops 1 --batch_size 1 --strategies lora --flash off --steps 1 --warmup_steps 1
           --dataloader_num_workers 0 --data_samples 1 --num_pages 1)
else
    # the strategies share the budget (after ~60 s writing the random checkpoint); a configuration past its
    # share is stopped and reported as timed out. QLoRA only where bitsandbytes is there (--no-qlora wheelhouse).
    strategies=full,frozen,lora
    if "$PY" -c "import bitsandbytes" 2>/dev/null; then strategies=$strategies,qlora
    else record qlora "not installed" "$(date +%s)" "no bitsandbytes (a --no-qlora wheelhouse?): the QLoRA tests fail, QLoRA is not benchmarked"; fi
    count=$(( $(tr -cd , <<<"$strategies" | wc -c) + 1 ))
    bench=(--random_init --strategies "$strategies" --flash auto --batch_size 8 --steps 2
           --warmup_steps 1 --data_samples 2 --num_pages 2 --config_timeout $(( bench_budget > 60 + count ? (bench_budget - 60) / count : 1 )))
fi
run_benchmark benchmark "$bench_budget" "$step" "after ${bench_budget}s (rows so far are in the report)" "${bench[@]}"

# ---- 4. padded vs packed batches (same model, same samples) ------------------------------------------------
step=$(date +%s)
batching_budget=$(( $(left) - 20 ))
say "padded vs packed batches -> logs/batching.log (budget ${batching_budget}s)"
if [ "$MODE" = dry-run ]; then
    batching=(--tiny --num_crops 1 --batch_size_per_gpu 2 --steps 1)
else
    batching=(--random_init --batch_size_per_gpu 4 --steps 2)
    "$PY" -c "from transformers.utils import is_flash_attn_2_available as a; assert a()" 2>/dev/null \
        && batching+=(--use_flash_attention)
fi
run_benchmark batching "$batching_budget" "$step" "after ${batching_budget}s" --batching "${batching[@]}"
[ "$MODE" = gpu ] && rm -rf "$WORK/cache"  # the 8 GB random checkpoint
say "done"
