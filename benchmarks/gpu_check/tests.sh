#!/usr/bin/env bash
# GPU check, step 2: the test suite with its CUDA parameters, on the GPU machine.
#
#   bash benchmarks/gpu_check/tests.sh            # the whole suite (CPU and CUDA params)
#   bash benchmarks/gpu_check/tests.sh cuda       # only the tests with "cuda" in their id (faster)
#   bash benchmarks/gpu_check/tests.sh -- ARGS    # any pytest arguments (e.g. tests/test_compact.py -x)
#
# The SmolLM2 tests are left out where the embedded model is missing (it does not fit the device
# tool's transfer). Writes $OUT/pytest.txt and $OUT/pytest.xml (JUnit). Builds first if needed.
set -uo pipefail
case "${1:-}" in ""|cuda|--) ;; *) echo "usage: $0 [cuda | -- PYTEST_ARGS]" >&2; exit 2 ;; esac
# shellcheck source=benchmarks/gpu_check/common.sh
source "$(dirname "$0")/common.sh"
need_gpu
ensure_built

smol_args
case "${1:-}" in
  "") args=(tests "${SMOL_ARGS[@]}") ;;
  cuda) if [ ${#SMOL_ARGS[@]} -gt 0 ]; then args=(tests "${SMOL_ARGS[@]:0:4}" -k "cuda and not smollm2")
        else args=(tests -k cuda); fi ;;
  --) shift; args=("$@") ;;
esac

step "tests: pytest ${args[*]}"
run_step pytest "$PY" -m pytest -q -rs -p no:cacheprovider --durations=15 --junitxml="$OUT/pytest.xml" "${args[@]}"
rc=$?
note "tests: exit status $rc"
exit "$rc"
