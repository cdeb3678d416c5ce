#!/usr/bin/env bash
# GPU check, step 4: the op benchmark on CUDA (each op and the fused path against plain torch,
# Llama-3-8B and LWM-7B shapes, float32 and bfloat16, L = 4K..128K), with window_scores'
# achieved bandwidth against a same-size copy (target: <= 2.5x one read of the keys).
# A few minutes on an H100. Writes $OUT/bench_ops_cuda.txt and $OUT/bench_ops_cuda.json.
#
#   bash benchmarks/gpu_check/bench_ops.sh                 # the default sweep
#   bash benchmarks/gpu_check/bench_ops.sh ARGS...         # other bench_ops.py arguments instead
#   bash benchmarks/gpu_check/bench_ops.sh resident-ab     # window_scores: register vs shared-memory queries
set -uo pipefail
# shellcheck source=benchmarks/gpu_check/common.sh
source "$(dirname "$0")/common.sh"
need_gpu
ensure_built

if [ "${1:-}" = "resident-ab" ]; then
  # window_scores with the query fragments in registers (the default for bf16, 128-row blocks,
  # D <= 128) against SNAPKV_WS_RESIDENT=0 (fragments read from shared memory; 2 CTAs per SM
  # instead of 1): which limit binds on this GPU. One command, about a minute.
  ab=(--configs llama3-8b --dtypes bfloat16 --ops window_scores --reps 50 --lengths 32768 131072)
  step "window_scores, query fragments in registers"
  run_step bench_ops_resident "$PY" benchmarks/bench_ops.py --device cuda "${ab[@]}"
  step "window_scores, query fragments in shared memory (SNAPKV_WS_RESIDENT=0)"
  run_step bench_ops_shared env SNAPKV_WS_RESIDENT=0 "$PY" benchmarks/bench_ops.py --device cuda "${ab[@]}"
  exit 0
fi

args=("$@")
[ $# -gt 0 ] || args=(--reps 20 --lengths 4096 16384 32768 65536 131072)
step "op benchmark: bench_ops.py --device cuda ${args[*]}"
run_step bench_ops_cuda "$PY" benchmarks/bench_ops.py --device cuda "${args[@]}" --json "$OUT/bench_ops_cuda.json"
