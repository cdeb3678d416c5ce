#!/usr/bin/env bash
# GPU check, step 1: build snapkv_ext._C with its CUDA kernels against the machine's own torch
# (2.11 on the lent H100; no network there: --no-build-isolation --no-deps --no-index), sm_90
# only (TORCH_CUDA_ARCH_LIST=9.0, MAX_JOBS=16: about a minute), then check that the ops load.
# Writes $OUT/machine.txt and $OUT/build.txt (the full compiler log).
#
# Later steps reuse this build: the library lands in snapkv_ext/ and a stamp in build/ (both
# git-ignored), which the device machine keeps between calls while it stays warm (30 s after a
# call). A step that finds no current build (a fresh machine, or csrc/ changed) builds first.
#
#   device run: bash benchmarks/gpu_check/build.sh
set -uo pipefail
# shellcheck source=benchmarks/gpu_check/common.sh
source "$(dirname "$0")/common.sh"
need_gpu

step "machine"
machine_info | tee "$OUT/machine.txt"

step "build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS)"
t0=$(date +%s)
if "$PY" -m pip --version >/dev/null 2>&1; then
  build=("$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e .)
else  # no pip: the same extension, built in place
  build=("$PY" setup.py build_ext --inplace)
fi
note "${build[*]}"
if ! timeout -s INT -k 30 "$STEP_TIMEOUT" "${build[@]}" > "$OUT/build.txt" 2>&1; then
  grep -iE 'error|FAILED' "$OUT/build.txt" | grep -v 'Wno-error' | head -40
  tail -30 "$OUT/build.txt"
  note "BUILD FAILED (full log: $OUT/build.txt)"
  rm -f "$BUILD_STAMP"
  exit 1
fi
mkdir -p "$(dirname "$BUILD_STAMP")"
build_hash > "$BUILD_STAMP"
grep -ciE 'warning' "$OUT/build.txt" | xargs printf '[gpu_check] compiler lines mentioning a warning: %s\n'
"$PY" -c "import snapkv_ext; assert snapkv_ext.has_cuda_kernels(), 'built without CUDA kernels'; print('[gpu_check] CUDA kernels registered')" || exit 1
note "build OK in $(( $(date +%s) - t0 ))s"
