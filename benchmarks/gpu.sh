#!/usr/bin/env bash
# Particle throughput of TDS and MCGdiff on one GPU (benchmarks/gpu.py), in under 8 minutes.
#
#   bash benchmarks/gpu.sh [--tiny] [more benchmarks/gpu.py options]
#
# Prints the machine (nvidia-smi, when there is one) and runs benchmarks/gpu.py, which prints
# the jax devices and one line per cell. The table goes to $OUT/gpu.md when OUT is set (with
# the printed log in $OUT/gpu.log), else to benchmarks/results/gpu.md; it is rewritten after
# every cell, so a run stopped early keeps what it finished.
#
# Time: gpu.py skips the cells that would not end within GPU_BUDGET seconds (default 380) and
# is stopped after GPU_TIME_LIMIT seconds (default 440). PYTHON picks the interpreter
# (default python3). `--tiny` (64 and 128 particles, 3 steps) checks the script on a CPU:
# JAX_PLATFORMS=cpu bash benchmarks/gpu.sh --tiny.
set -u
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
BUDGET=${GPU_BUDGET:-380}
LIMIT=${GPU_TIME_LIMIT:-440}
export PYTHONUNBUFFERED=1
# room for the digits U-Net's activations at 262144 particles (JAX's default takes 75%)
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
export DIFFPRIOR_GPU_COMMAND="bash benchmarks/gpu.sh $*"

if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    TABLE=$OUT/gpu.md
    LOG=$OUT/gpu.log
else
    TABLE=benchmarks/results/gpu.md
    LOG=/dev/null
fi

run() {
    echo "== machine: $(uname -m), $(nproc) cores, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    if command -v nvidia-smi > /dev/null 2>&1; then
        nvidia-smi || true
    else
        echo "(no nvidia-smi)"
    fi
    echo "== $PYTHON: $("$PYTHON" --version 2>&1), PYTHONPATH=${PYTHONPATH:-}"
    if command -v timeout > /dev/null 2>&1; then
        timeout -k 15 "$LIMIT" "$PYTHON" benchmarks/gpu.py --out "$TABLE" --budget "$BUDGET" "$@"
    else
        echo "(no timeout command: the budget alone bounds the run)"
        "$PYTHON" benchmarks/gpu.py --out "$TABLE" --budget "$BUDGET" "$@"
    fi
    status=$?
    if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
        printf '\nStopped after %s s (GPU_TIME_LIMIT): the rows above are the cells that finished.\n' \
            "$LIMIT" >> "$TABLE"
    fi
    echo "== $TABLE (gpu.py exit status $status)"
    cat "$TABLE" 2> /dev/null || echo "(no table written)"
    return "$status"
}

run "$@" 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
