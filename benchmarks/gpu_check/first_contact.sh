#!/usr/bin/env bash
# The first contact with a lent GPU in ONE device command of at most 8 minutes, build included.
# The steps run most valuable first, each under min(its cap, the time left of the budget); each
# one's results are packed into $OUT as soon as it ends, so a command stopped part way still
# returns everything done before.
#
#   device run:  bash benchmarks/gpu_check/first_contact.sh          (timeout_s 600; ~8 min)
#   again, only the benchmarks, from the build the first call returned:
#     here:      tar -xzf <files_at>/build.tar.gz   (snapkv_ext/_C.cpython-312-*.so, build/gpu_check.stamp)
#     device:    bash benchmarks/gpu_check/first_contact.sh bench   (carry those two paths)
#   here, dry:   GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check/first_contact.sh
#                every step on the CPU with tiny shapes and no GPU tool (what CI runs:
#                tests/test_gpu_check.py), so the script cannot rot unseen.
#
# Steps (first contact; `bench` runs ops and e2e only):
#   build      sm_90 only, every core (build.sh), the machine's description
#   tests      the real-GPU cases (pytest -m gpu) of each op test file, one process per file
#              (a crash hides nothing else); no CUDA simulator, no lm_eval
#   ops        bench_ops.py on CUDA: Llama-3-8B and LWM-7B, bf16 and fp32, 32K and 128K, window_scores
#              and the fused compress (allocating and into a cache), then window_scores with its
#              query fragments resident in registers against shared memory (SNAPKV_WS_RESIDENT=0),
#              then ragged_attention against SDPA on the decode shapes (--decode)
#   e2e        bench_generate.py: Llama-2-7B shape, bf16, 16K prompt, batch 2: prefill and decode
#   ncu        Nsight Compute on the window-scoring kernels, --clock-control none
#   memcheck   compute-sanitizer on the op tests' GPU cases (small shapes)
#   racecheck  the same, shared-memory races
#
# Back in $OUT (the device tool returns at most 8 files): summary.txt (one line per step: status,
# seconds, what it wrote), results.tar.gz (every step's log and JSON so far) and build.tar.gz (the
# library and its stamp, for a second call). Knobs: FIRST_CONTACT_BUDGET (seconds for the whole
# command, default 470), GPU_CHECK_DRY_RUN=1.
set -uo pipefail
mode=${1:-all}
case "$mode" in all|bench) ;; *) echo "usage: $0 [bench]" >&2; exit 2 ;; esac
DRY=${GPU_CHECK_DRY_RUN:-0}
BACK=${OUT:-$(cd "$(dirname "$0")/../.." && pwd)/out}  # what the device tool brings back
W=$(mktemp -d "${TMPDIR:-/tmp}/first_contact.XXXXXX")  # every step's files; packed into $BACK
export OUT=$W
# shellcheck source=benchmarks/gpu_check/common.sh
source "$(dirname "$0")/common.sh"
mkdir -p "$BACK"
BUDGET=${FIRST_CONTACT_BUDGET:-470}
T0=$SECONDS
SUMMARY=$BACK/summary.txt
: > "$SUMMARY"
{ echo "first contact ($mode, dry run $DRY), $(date -u '+%F %T UTC'), budget ${BUDGET}s"; } >> "$SUMMARY"

if [ "$DRY" = 1 ]; then
  DEV=cpu
  note "dry run: every step on the CPU, tiny shapes, no GPU tool"
else
  DEV=cuda
  need_gpu
fi

pack() {  # every step's files so far -> $BACK/results.tar.gz (small: logs and JSON)
  tar -czf "$BACK/results.tar.gz.part" -C "$W" . 2>/dev/null && mv "$BACK/results.tar.gz.part" "$BACK/results.tar.gz"
}

# run_fn NAME CAP FN ARGS...: the shell function FN in its own process group, its output in
# $W/NAME.txt; after CAP seconds SIGINT (pytest and the benchmarks still write what they got),
# 15 s later SIGKILL. Returns FN's status, 124 when it was stopped.
run_fn() {
  local name=$1 cap=$2 pid start=$SECONDS
  shift 2
  set -m  # the background job gets its own process group: the signal reaches all its children
  ( "$@" ) > "$W/$name.txt" 2>&1 &
  pid=$!
  set +m
  while kill -0 "$pid" 2>/dev/null; do
    if [ $((SECONDS - start)) -ge "$cap" ]; then
      kill -INT -- "-$pid" 2>/dev/null
      for _ in $(seq 15); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
      kill -KILL -- "-$pid" 2>/dev/null
      wait "$pid" 2>/dev/null
      echo "[gpu_check] $name: stopped after ${cap}s" >> "$W/$name.txt"
      return 124
    fi
    sleep 1
  done
  wait "$pid"
}

# stage NAME CAP FN ARGS...: FN under min(CAP, time left) seconds (run_fn), then a line in
# summary.txt, the end of its log on the terminal, and the results packed. Skipped (said so)
# when under 20 s of the budget are left.
stage() {
  local name=$1 cap=$2 left t rc what
  shift 2
  left=$((BUDGET - (SECONDS - T0)))
  if [ "$left" -lt 20 ]; then
    printf '%-10s skipped: %ss of the budget left\n' "$name" "$left" >> "$SUMMARY"
    return 0
  fi
  [ "$cap" -lt "$left" ] || cap=$left
  step "$name (at most ${cap}s; ${left}s left)"
  t=$SECONDS
  run_fn "$name" "$cap" "$@"
  rc=$?
  tail -n 25 "$W/$name.txt"
  case $rc in 0) what="ok" ;; 124) what="stopped at ${cap}s (partial results kept)" ;; *) what="failed (rc $rc)" ;; esac
  printf '%-10s %-40s %4ss\n' "$name" "$what" $((SECONDS - t)) >> "$SUMMARY"
  pack
  return "$rc"
}

# The CUDA tests of every op file, each in its own pytest process.
op_tests() {
  local f rc=0
  for f in "${OPS_TESTS[@]}"; do
    echo "---- $f"
    "$PY" -m pytest -q -rs -p no:cacheprovider -m gpu --junitxml="$W/pytest-$(basename "$f" .py).xml" "$f" || rc=1
  done
  return "$rc"
}

if [ "$DRY" = 1 ]; then
  OPS_ARGS=(--device cpu --configs llama3-8b --dtypes float32 --lengths 256 --max-capacity-prompt 128 --reps 1 --no-memory)
  AB_ARGS=(--device cpu --configs llama3-8b --dtypes bfloat16 --ops window_scores --lengths 256 --max-capacity-prompt 128
           --reps 1 --no-memory)
  DECODE_ARGS=(--device cpu --decode --decode-configs smollm2 --reps 1)
  E2E_ARGS=(--model tiny --device cpu --dtype float32 --lengths 256 --batch 2 --max-capacity-prompt 64 --reps 1 --decode-steps 2)
  NCU_LEN=256
else
  OPS_ARGS=(--device cuda --configs llama3-8b lwm-7b --dtypes bfloat16 float32 --lengths 32768 131072 --reps 10)
  AB_ARGS=(--device cuda --configs llama3-8b --dtypes bfloat16 --ops window_scores --lengths 32768 131072 --reps 30)
  DECODE_ARGS=(--device cuda --decode --reps 20)
  E2E_ARGS=(--model llama2-7b --device cuda --dtype bfloat16 --lengths 16384 --batch 2 --max-capacity-prompt 2048
            --reps 3 --decode-steps 32)
  NCU_LEN=65536
fi
# The sanitizers: the GPU cases of the op tests (-m gpu), without torch.compile's own kernels and
# the million-token case (-k: small shapes).
SAN_SELECT="not compile and not million"

build_step() {
  machine_info > "$W/machine.txt" 2>&1 || true
  if [ "$DRY" = 1 ]; then
    "$PY" -c "import snapkv_ext, sys; print('[gpu_check] dry run: the library here loads; built with CUDA kernels:', snapkv_ext.has_cuda_kernels())"
  elif built_ok; then
    note "reusing the CUDA build in snapkv_ext/ (stamp matches)"
  else
    bash "$GPU_CHECK_DIR/build.sh"
  fi || return 1
  local so
  so=$(ls snapkv_ext/_C*.so 2>/dev/null | head -1)
  [ -n "$so" ] || { note "no library in snapkv_ext/"; return 1; }
  tar -czf "$BACK/build.tar.gz" "$so" $( [ -f "$BUILD_STAMP" ] && echo "${BUILD_STAMP#"$REPO"/}" )
  note "the library is in build.tar.gz ($(stat -c %s "$BACK/build.tar.gz") bytes; over 16 MiB it does not come back)"
}

ops_step() {
  "$PY" benchmarks/bench_ops.py "${OPS_ARGS[@]}" --ops window_scores fused fused_into --json "$W/bench_ops.json" || return 1
  echo "---- window_scores: query fragments in registers, then in shared memory (SNAPKV_WS_RESIDENT=0)"
  "$PY" benchmarks/bench_ops.py "${AB_ARGS[@]}" --json "$W/bench_ops_resident.json" || return 1
  SNAPKV_WS_RESIDENT=0 "$PY" benchmarks/bench_ops.py "${AB_ARGS[@]}" --json "$W/bench_ops_shared.json" || return 1
  echo "---- ragged_attention (decode with head budgets) against SDPA"
  "$PY" benchmarks/bench_ops.py "${DECODE_ARGS[@]}" --json "$W/bench_decode.json"
}

e2e_step() {
  "$PY" benchmarks/bench_generate.py "${E2E_ARGS[@]}" --json "$W/bench_generate.json"
}

ncu_step() {
  local bench=(benchmarks/bench_ops.py "${AB_ARGS[@]}" --reps 1 --lengths "$NCU_LEN")
  if [ "$DRY" = 1 ]; then
    note "dry run: the profiled command without ncu"
    "$PY" "${bench[@]}"
    return
  fi
  local ncu
  ncu=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  [ -n "$ncu" ] || { note "ncu: not installed here"; return 4; }
  "$ncu" --clock-control none --target-processes all --kernel-name "regex:window|stats|votes|wscore" \
    --launch-skip 2 --launch-count 4 --set detailed -f -o "$W/ncu_window_scores" "$PY" "${bench[@]}" || return 1
  "$ncu" --import "$W/ncu_window_scores.ncu-rep" --page details > "$W/ncu_window_scores_details.txt" 2>&1
  rm -f "$W/ncu_window_scores.ncu-rep"  # the text pages are what comes back
}

sanitize_step() {  # sanitize_step TOOL
  local cs=()
  if [ "$DRY" = 1 ]; then
    note "dry run: the sanitized command without compute-sanitizer"
  else
    cs=("$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")"
        --tool "$1" --error-exitcode 9 --print-limit 100)
    [ -x "${cs[0]}" ] || { note "compute-sanitizer: not installed here"; return 4; }
  fi
  local env=()
  [ "$1" = memcheck ] && env=(PYTORCH_NO_CUDA_MEMORY_CACHING=1)  # each tensor its own allocation
  env "${env[@]}" "${cs[@]}" "$PY" -m pytest -q -p no:cacheprovider -m gpu -k "$SAN_SELECT" "${OPS_TESTS[@]}"
}

status=0
stage build 240 build_step || { note "no library: nothing else can run"; pack; cat "$SUMMARY"; exit 1; }
if [ "$mode" = all ]; then
  stage tests 150 op_tests || status=1
fi
stage ops 120 ops_step || status=1
stage e2e 100 e2e_step || status=1
if [ "$mode" = all ]; then
  stage ncu 60 ncu_step || status=1
  stage memcheck 90 sanitize_step memcheck || status=1
  stage racecheck 90 sanitize_step racecheck || status=1
fi
printf 'total %ss, status %s\n' $((SECONDS - T0)) "$status" >> "$SUMMARY"
pack
cat "$SUMMARY"
rm -rf "$W"
exit "$status"
