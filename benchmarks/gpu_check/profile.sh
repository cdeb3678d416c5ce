#!/usr/bin/env bash
# GPU check, step 6: profiles.
#
#   bash benchmarks/gpu_check/profile.sh          # both parts below
#   bash benchmarks/gpu_check/profile.sh nsys     # (a) only
#   bash benchmarks/gpu_check/profile.sh ncu      # (b) only
#
# (a) Nsight Systems over a short op benchmark (llama3-8b, bf16, L = 16K and 64K), tracing CUDA
#     and the NVTX ranges snapkv::<op> that the ops open:
#       nsys profile --trace=cuda,nvtx --sample=none --cpuctxsw=none -o nsys_bench_ops \
#           python3 benchmarks/bench_ops.py --device cuda --configs llama3-8b --dtypes bfloat16 ...
#       nsys stats --report nvtx_sum --report nvtx_kern_sum --report cuda_gpu_kern_sum ... nsys_bench_ops.nsys-rep
#     -> $OUT/nsys_bench_ops.txt (the run), $OUT/nsys_stats.txt (per NVTX range, per kernel),
#        $OUT/nsys_bench_ops.nsys-rep (open in the Nsight Systems GUI; kept when under 16 MB).
#     nsys is not on the lent machines' PATH (KINDS.md): it is looked for in the CUDA and Nsight
#     install folders. Where it makes no report (seen there: a .qdstrm and no report), the step
#     says so and writes $OUT/torch_profile.txt instead (torch.profiler, same ops, same names).
# (b) Nsight Compute on the window-scoring kernels (names matching NCU_KERNEL_REGEX, default
#     'window|stats|votes|wscore'), after skipping the first calls:
#       ncu --clock-control none --kernel-name regex:'window|stats|votes|wscore' --launch-skip 2 \
#           --launch-count 4 --set full -o ncu_window_scores python3 benchmarks/bench_ops.py \
#           --device cuda --ops window_scores --configs llama3-8b --dtypes bfloat16 --lengths 65536 --reps 1
#     -> $OUT/ncu_window_scores.txt (the run), $OUT/ncu_window_scores_details.txt (every section:
#        throughput vs speed of light, memory workload, occupancy, warp stalls, source counters),
#        $OUT/ncu_window_scores_summary.csv (time, DRAM bytes read, DRAM and SM throughput per
#        kernel), $OUT/ncu_window_scores.ncu-rep (for the GUI; kept when under 16 MB).
#     --clock-control none leaves the card's clocks alone (the device README asks for that).
#     Knobs: NCU_KERNEL_REGEX, NCU_LAUNCH_SKIP (2), NCU_LAUNCH_COUNT (4), NCU_SET (full),
#     NCU_BENCH_ARGS (the bench_ops.py arguments after --device cuda).
set -uo pipefail
parts=("$@")
[ $# -gt 0 ] || parts=(nsys ncu)
for p in "${parts[@]}"; do
  case "$p" in nsys|ncu) ;; *) echo "usage: $0 [nsys] [ncu]" >&2; exit 2 ;; esac
done
# shellcheck source=benchmarks/gpu_check/common.sh
source "$(dirname "$0")/common.sh"
need_gpu
ensure_built
WORK=$(mktemp -d)  # reports and their sqlite exports; only what fits the device tool goes to $OUT
trap 'rm -rf "$WORK"' EXIT
MAX_BACK=$((16 * 1024 * 1024))

find_tool() {  # find_tool NAME: the first NAME on PATH, in $CUDA_HOME/bin, or in an Nsight folder
  local c
  for c in "$(command -v "$1" 2>/dev/null)" "${CUDA_HOME:-/usr/local/cuda}/bin/$1" \
           /opt/nvidia/nsight-systems/*/bin/"$1" /usr/local/cuda/nsight-systems-*/bin/"$1" \
           /opt/nvidia/nsight-compute/*/"$1" /usr/local/cuda/nsight-compute-*/"$1" \
           /opt/nvidia/nsight-compute/*/host/target-linux-x64/"$1"; do
    [ -n "$c" ] && [ -x "$c" ] && { echo "$c"; return 0; }
  done
  return 1
}

keep() {  # keep FILE: copy into $OUT when the device tool can bring it back
  if [ -f "$1" ] && [ "$(stat -c %s "$1")" -le $MAX_BACK ]; then cp "$1" "$OUT/"
  elif [ -f "$1" ]; then note "$(basename "$1") is over 16 MB: not copied to \$OUT"; fi
}

profile_nsys() {
  local nsys rep qd imp
  step "Nsight Systems: bench_ops with NVTX ranges"
  if ! nsys=$(find_tool nsys); then
    note "nsys: UNSUPPORTED here (not on PATH nor in the CUDA/Nsight folders): torch.profiler instead"
    torch_profile; return
  fi
  note "nsys: $nsys ($("$nsys" --version 2>&1 | head -1))"
  run_step nsys_bench_ops "$nsys" profile --trace=cuda,nvtx --sample=none --cpuctxsw=none \
    --force-overwrite=true -o "$WORK/nsys_bench_ops" \
    "$PY" benchmarks/bench_ops.py --device cuda --configs llama3-8b --dtypes bfloat16 --lengths 16384 65536 --reps 5
  rep=$WORK/nsys_bench_ops.nsys-rep
  qd=$WORK/nsys_bench_ops.qdstrm
  if [ ! -f "$rep" ] && [ -f "$qd" ]; then
    # nsys left the raw stream: convert it where its importer is installed
    imp=$(find "$(dirname "$(readlink -f "$nsys")")/.." -name QdstrmImporter -type f 2>/dev/null | head -1)
    if [ -n "$imp" ]; then note "converting the .qdstrm with $imp"; "$imp" -i "$qd" >> "$OUT/nsys_bench_ops.txt" 2>&1; fi
  fi
  if [ ! -f "$rep" ]; then
    note "nsys: UNSUPPORTED here: no .nsys-rep made (made: $(cd "$WORK" && echo *)): torch.profiler instead" |
      tee -a "$OUT/nsys_bench_ops.txt"
    torch_profile; return
  fi
  keep "$rep"
  if ! "$nsys" stats --force-export=true --report nvtx_sum --report nvtx_kern_sum --report cuda_gpu_kern_sum \
      --report cuda_api_sum --report cuda_gpu_mem_time_sum "$rep" > "$OUT/nsys_stats.txt" 2>&1; then
    note "nsys stats with named reports failed (older nsys?): its default reports instead" | tee -a "$OUT/nsys_stats.txt"
    "$nsys" stats --force-export=true "$rep" >> "$OUT/nsys_stats.txt" 2>&1 || status=1
  fi
  grep -A 14 -iE 'nvtx.*sum|NVTX Range Summary' "$OUT/nsys_stats.txt" | head -40
}

torch_profile() {
  run_step torch_profile "$PY" benchmarks/gpu_check/torch_profile.py --config llama3-8b --dtype bfloat16 --length 65536 ||
    status=1
}

profile_ncu() {
  local ncu rep
  step "Nsight Compute: window-scoring kernels"
  if ! ncu=$(find_tool ncu); then note "ncu: UNSUPPORTED here (not installed)"; status=1; return; fi
  note "ncu: $ncu ($("$ncu" --version 2>&1 | tail -1))"
  local regex=${NCU_KERNEL_REGEX:-window|stats|votes|wscore}
  # shellcheck disable=SC2206  # the user's arguments, split on spaces
  local bench=(${NCU_BENCH_ARGS:---ops window_scores --configs llama3-8b --dtypes bfloat16 --lengths 65536 --reps 1})
  rep=$WORK/ncu_window_scores.ncu-rep
  run_step ncu_window_scores "$ncu" --clock-control none --target-processes all --kernel-name "regex:$regex" \
    --launch-skip "${NCU_LAUNCH_SKIP:-2}" --launch-count "${NCU_LAUNCH_COUNT:-4}" --set "${NCU_SET:-full}" \
    --import-source yes -f -o "${rep%.ncu-rep}" "$PY" benchmarks/bench_ops.py --device cuda "${bench[@]}" || status=1
  if grep -qE 'ERR_NVGPUCTRPERM|LibraryNotLoaded|Failed to initialize the profiler|not supported' "$OUT/ncu_window_scores.txt"; then
    note "ncu: UNSUPPORTED here: the profiler could not read this GPU's counters (see above)" | tee -a "$OUT/ncu_window_scores.txt"
    status=1; return
  fi
  if [ ! -f "$rep" ]; then
    note "ncu: no report made: no kernel matched regex:$regex after the skip? (nsys_stats.txt or torch_profile.txt list the kernel names)" |
      tee -a "$OUT/ncu_window_scores.txt"
    status=1; return
  fi
  keep "$rep"
  "$ncu" --import "$rep" --page details --print-details all > "$OUT/ncu_window_scores_details.txt" 2>&1 ||
    "$ncu" --import "$rep" --page details > "$OUT/ncu_window_scores_details.txt" 2>&1
  "$ncu" --import "$rep" --page raw --csv --metrics \
    gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__throughput.avg.pct_of_peak_sustained_elapsed,launch__grid_size,launch__registers_per_thread \
    > "$OUT/ncu_window_scores_summary.csv" 2>&1
  cat "$OUT/ncu_window_scores_summary.csv"
}

status=0
for p in "${parts[@]}"; do
  case "$p" in nsys) profile_nsys ;; ncu) profile_ncu ;; esac
done
note "profile: status $status; files in $OUT: $(cd "$OUT" && echo *)"
exit "$status"
