#!/usr/bin/env bash
# The first call on a lent GPU is benchmarks/gpu_check/first_contact.sh (one command, at most 8
# minutes with the build, results kept as each step ends). This file is the longer look:
# everything to run when a GPU machine is lent: build with the CUDA kernels, the whole test suite
# (CUDA params included), compute-sanitizer (memcheck, racecheck, synccheck, initcheck) on the
# CUDA op tests, the op benchmark, the end-to-end benchmarks, and Nsight Systems / Compute profiles.
# Results land in $OUT (the device tool's output folder) or ./out.
#
# This file runs the steps in benchmarks/gpu_check/ in order, with no time limit per step: for a
# machine without the device tool's limits. On the lent machine (one command <= 10 minutes, 30
# minutes of device time a session, at most 8 files back from $OUT per command) run them one
# device command at a time, most valuable first; each keeps what it got in $OUT, and stops its
# main command after GPU_CHECK_STEP_TIMEOUT (540 s) so that even a slow one returns its output:
#
#   bash benchmarks/gpu_check/build.sh                  # ~1 min: build (sm_90 only), machine.txt
#   bash benchmarks/gpu_check/tests.sh                  # the suite (tests.sh cuda: CUDA tests only)
#   bash benchmarks/gpu_check/bench_ops.sh              # op benchmark + window_scores bandwidth
#   bash benchmarks/gpu_check/profile.sh                # nsys (NVTX snapkv::<op>) + ncu (window kernels)
#   bash benchmarks/gpu_check/sanitize.sh memcheck      # one compute-sanitizer tool per command:
#   bash benchmarks/gpu_check/sanitize.sh racecheck     #   memcheck, racecheck, synccheck, initcheck
#   bash benchmarks/gpu_check/bench_e2e.sh generate     # end to end: generate, max-length, questions
#
# Later steps reuse build.sh's library (git-ignored files the device machine keeps while it is
# warm, i.e. for 30 s after a call); a step that finds none, or one built from other sources,
# builds first, so any step can open a session. Steps that belong together can share a command
# (`bash benchmarks/gpu_check/build.sh && bash benchmarks/gpu_check/tests.sh cuda`) while their
# files stay within 8. benchmarks/gpu_check/common.sh says which variables the steps read.
#
#   whole run: bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
export GPU_CHECK_STEP_TIMEOUT=${GPU_CHECK_STEP_TIMEOUT:-0}
S=benchmarks/gpu_check
status=0
failed=()
run() {
  bash "$S/$1" "${@:2}"
  local rc=$?
  if [ $rc -ne 0 ]; then
    status=1
    failed+=("$* (rc $rc)")
    # no GPU (rc 3) or no build: nothing else can run
    if [ "$1" = build.sh ] || [ $rc -eq 3 ]; then echo "[gpu_check] $1 failed (rc $rc): stopping"; exit "$rc"; fi
  fi
}
run build.sh
run tests.sh
for tool in memcheck racecheck synccheck initcheck; do run sanitize.sh "$tool"; done
run bench_ops.sh
run bench_e2e.sh
run profile.sh
echo
echo "[gpu_check] done: status $status${failed[*]:+; failed: ${failed[*]}}"
exit $status
