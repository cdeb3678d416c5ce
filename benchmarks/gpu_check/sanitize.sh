#!/usr/bin/env bash
# GPU check, step 3: compute-sanitizer over the CUDA op tests (pytest -k cuda on the op test
# files), one tool per call, since each can take minutes:
#
#   bash benchmarks/gpu_check/sanitize.sh memcheck     # out-of-bounds and misaligned accesses, leaks
#   bash benchmarks/gpu_check/sanitize.sh racecheck    # shared-memory races
#   bash benchmarks/gpu_check/sanitize.sh synccheck    # invalid __syncthreads / warp-sync use
#   bash benchmarks/gpu_check/sanitize.sh initcheck    # reads of uninitialised device memory
#
# (Several tools in one call run one after the other.) Writes $OUT/sanitizer-TOOL.txt, ending in
# one verdict line: PASS, ERRORS (with the count), FAILED (tests failed), TIMED OUT, DID NOT RUN,
# or UNSUPPORTED when the tool refuses the machine (seen on gVisor machines: "Device not
# supported"; the Firecracker H100/H200 machines ran it). Exit status 0 only on PASS.
# Which tests: SANITIZE_SELECT, a pytest -k expression (default "cuda and not compile_fullgraph":
# the CUDA cases of the op test files, without torch.compile); more pytest arguments:
# SANITIZE_PYTEST_ARGS (e.g. "-x", or "--maxfail 3").
set -uo pipefail
# shellcheck source=benchmarks/gpu_check/common.sh
source "$(dirname "$0")/common.sh"
[ $# -ge 1 ] || { echo "usage: $0 memcheck|racecheck|synccheck|initcheck [...]" >&2; exit 2; }
for tool in "$@"; do
  case "$tool" in memcheck|racecheck|synccheck|initcheck) ;;
    *) echo "unknown tool '$tool' (memcheck, racecheck, synccheck, initcheck)" >&2; exit 2 ;; esac
done
need_gpu
CS=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
[ -x "$CS" ] || { note "compute-sanitizer: UNSUPPORTED (not installed: not on PATH nor in \$CUDA_HOME/bin)"; exit 4; }
ensure_built

# The CUDA cases of the op tests; torch.compile's own kernels (Inductor/Triton) are not ours.
SELECT=${SANITIZE_SELECT:-cuda and not compile_fullgraph}
# shellcheck disable=SC2206  # word splitting of the user's extra arguments is intended
extra=(${SANITIZE_PYTEST_ARGS:-})
status=0
for tool in "$@"; do
  step "compute-sanitizer --tool $tool: pytest -k '$SELECT' ${extra[*]} ${OPS_TESTS[*]}"
  # torch's caching allocator hides accesses past a tensor's end but inside its block from
  # memcheck, and makes reused memory look initialised to initcheck: for those two, every tensor
  # gets its own cudaMalloc (PYTORCH_NO_CUDA_MEMORY_CACHING=1; slower).
  caching=()
  case "$tool" in memcheck|initcheck) caching=(PYTORCH_NO_CUDA_MEMORY_CACHING=1) ;; esac
  run_step "sanitizer-$tool" env "${caching[@]}" \
    "$CS" --tool "$tool" --error-exitcode 9 --print-limit 100 \
    "$PY" -m pytest -q -p no:cacheprovider -k "$SELECT" "${extra[@]}" "${OPS_TESTS[@]}"
  rc=$?
  log=$OUT/sanitizer-$tool.txt
  errors=$(sed -n 's/^========= ERROR SUMMARY: \([0-9]*\) error.*/\1/p' "$log" | tail -1)
  if grep -qiE '^=+ .*(device not supported|not supported on this|unsupported device|unable to (attach|initialize)|failed to (initialize|attach))' "$log"; then
    verdict="UNSUPPORTED: compute-sanitizer $tool refused this machine (rc=$rc; see the '=========' lines above)"
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    verdict="TIMED OUT after ${STEP_TIMEOUT}s (errors so far: ${errors:-?}); narrow it with SANITIZE_PYTEST_ARGS"
  elif [ -z "$errors" ] && ! grep -qE '[0-9]+ (passed|failed|error)' "$log"; then
    verdict="DID NOT RUN: no pytest result and no sanitizer summary (rc=$rc): the tool refused the machine or the program crashed; see the log"
  elif [ -n "$errors" ] && [ "$errors" -gt 0 ]; then
    verdict="ERRORS: $errors reported by $tool"
  elif [ "$rc" -ne 0 ]; then
    verdict="FAILED: exit status $rc (tests failed under the tool; it reported ${errors:-no} errors)"
  else
    verdict="PASS: 0 errors"
  fi
  case "$verdict" in PASS*) ;; *) status=1 ;; esac
  note "sanitizer $tool: $verdict" | tee -a "$log"
done
exit "$status"
