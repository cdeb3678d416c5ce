#!/usr/bin/env bash
# GPU check, step 4: the op benchmark on CUDA (each op and the fused path against plain torch,
# Llama-3-8B and LWM-7B shapes, float32 and bfloat16, L = 4K..128K), with window_scores'
# achieved bandwidth against a same-size copy (target: <= 2.5x one read of the keys).
# A few minutes on an H100. Writes $OUT/bench_ops_cuda.txt and $OUT/bench_ops_cuda.json.
#
#   bash benchmarks/gpu_check/bench_ops.sh                 # the default sweep
#   bash benchmarks/gpu_check/bench_ops.sh ARGS...         # other bench_ops.py arguments instead
set -uo pipefail
# shellcheck source=benchmarks/gpu_check/common.sh
source "$(dirname "$0")/common.sh"
need_gpu
ensure_built

args=("$@")
[ $# -gt 0 ] || args=(--reps 20 --lengths 4096 16384 32768 65536 131072)
step "op benchmark: bench_ops.py --device cuda ${args[*]}"
run_step bench_ops_cuda "$PY" benchmarks/bench_ops.py --device cuda "${args[@]}" --json "$OUT/bench_ops_cuda.json"
