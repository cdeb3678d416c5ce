#!/usr/bin/env bash
# Everything to run when a GPU machine is lent, in one call:
#   build with the CUDA kernels, the whole test suite (CUDA params included), compute-sanitizer
#   (memcheck, racecheck, synccheck) on the op tests, and the GPU op benchmark.
# Results land in $OUT (the device tool's output folder) or ./out.
#
#   device run: bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
PY=${PY:-python3}
export SNAPKV_REQUIRE_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0}
export PYTHONUNBUFFERED=1
status=0

step() { printf '\n==== %s (%s)\n' "$1" "$(date +%T)"; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"

step "build"
if ! "$PY" -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  tail -60 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
"$PY" -c "import snapkv_ext; assert snapkv_ext.has_cuda_kernels(); print('CUDA kernels registered')" || exit 1

step "tests"
"$PY" -m pytest -q -rs tests 2>&1 | tee "$OUT/pytest.txt" | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "compute-sanitizer"
OPS_TESTS="tests/test_window_scores.py tests/test_pool_topk.py tests/test_compact.py tests/test_compress.py tests/test_opcheck_compile.py"
for tool in memcheck racecheck synccheck; do
  echo "-- $tool"
  compute-sanitizer --tool "$tool" --error-exitcode 9 "$PY" -m pytest -q -x -k "cuda" $OPS_TESTS \
    > "$OUT/sanitizer-$tool.txt" 2>&1
  rc=$?
  tail -4 "$OUT/sanitizer-$tool.txt"
  [ $rc -eq 0 ] || { echo "$tool FAILED rc=$rc"; status=1; }
done

step "op benchmark"
"$PY" benchmarks/bench_ops.py --device cuda --reps 20 --lengths 4096 16384 32768 65536 131072 \
  --json "$OUT/bench_ops_cuda.json" 2>&1 | tee "$OUT/bench_ops_cuda.txt"

step "done (status $status)"
exit $status
