#!/usr/bin/env bash
# Compile check of every source under csrc/ against another torch's headers (default 2.11.0, what
# the lent GPU machines have preinstalled; the project pins 2.14.1 locally). Objects only: no link,
# no run, no GPU needed. Catches C++ API differences (and C++20 in our sources: torch 2.11's
# BuildExtension compiles with -std=c++17, 2.14's with -std=c++20) before a GPU session finds them.
#
#   tools/check_torch_compat.sh            # torch 2.11.0
#   tools/check_torch_compat.sh 2.12.0     # any other version on PyPI
#
# How: `pip download --no-deps torch==V` (the PyPI wheel for Linux is the CUDA 13.0 build), then
# only torch/include/ and torch/utils/cpp_extension.py are unpacked into .venv/torch-V/ (about
# 60 MB; the wheel itself, over 500 MB, is deleted) and reused by later runs. The compile flags
# are setup.py's (SNAPKV_WITH_CUDA, -O3 -fopenmp -fno-trapping-math -Wall -Wno-unknown-pragmas -Wno-psabi for C++, -O3 -lineinfo
# --expt-relaxed-constexpr for nvcc, sm_80 and sm_90) plus what torch V's own BuildExtension adds,
# read from its cpp_extension.py (the -std=c++NN it appends, COMMON_NVCC_FLAGS), with its include
# paths (torch/include, torch/csrc/api/include, $CUDA_HOME/include) and Python's include dirs.
# csrc/*.cpp and csrc/cuda/*.cpp go to the host compiler (c++, or $CXX), csrc/cuda/*.cu to
# $CUDA_HOME/bin/nvcc; sources are globbed, so new files are checked too. ninja runs the compiles
# (MAX_JOBS in parallel, default nproc) and keeps going after a failure, so one run names every
# broken file; its dependency files make a re-run recompile only what changed (--clean: all).
#
# Env: SNAPKV_COMPAT_FRONTEND=1 checks with the front ends only (C++ -fsyntax-only, CUDA to PTX with
# host -O0: the header and API check without code generation, several times faster), MAX_JOBS, CUDA_HOME (default /usr/local/cuda), CXX, PY (default .venv/bin/python, else
# python3), TORCH_CUDA_ARCH_LIST (default "8.0;9.0"), SNAPKV_COMPAT_DIR (default .venv/torch-V).
# Without nvcc the .cu files are skipped with a note (the summary says so), unless
# SNAPKV_REQUIRE_CUDA=1. Exit status: 0 when every file compiled, 1 when any failed, 2 on a
# set-up error (download, missing tools).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

clean=0
version=2.11.0
for a in "$@"; do
  case "$a" in
    --clean) clean=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    [0-9]*) version=$a ;;
    *) echo "usage: $0 [VERSION] [--clean]" >&2; exit 2 ;;
  esac
done

log() { printf '[compat] %s\n' "$*" >&2; }
die() { printf '[compat] %s\n' "$*" >&2; exit 2; }

if [ -n "${PY:-}" ]; then :; elif [ -x "$ROOT/.venv/bin/python" ]; then PY=$ROOT/.venv/bin/python; else PY=python3; fi
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
CXX=${CXX:-c++}
MAX_JOBS=${MAX_JOBS:-$(nproc)}
DIR=${SNAPKV_COMPAT_DIR:-$ROOT/.venv/torch-$version}
if [ -x "$(dirname "$PY")/ninja" ]; then NINJA=$(dirname "$PY")/ninja; else NINJA=$(command -v ninja || true); fi
[ -n "$NINJA" ] || die "ninja not found (pip install ninja)"
command -v "$CXX" >/dev/null || die "host compiler '$CXX' not found"
t0=$(date +%s)

# ---------------------------------------------------------------- torch V's headers, once
if [ ! -f "$DIR/.complete" ]; then
  log "fetching torch==$version's headers into ${DIR#"$ROOT"/}"
  rm -rf "$DIR"
  mkdir -p "$DIR"
  wheels=$(mktemp -d)
  trap 'rm -rf "$wheels"' EXIT
  if ! "$PY" -m pip download -q --no-deps --no-cache-dir --only-binary=:all: -d "$wheels" "torch==$version" \
      > "$wheels/pip.log" 2>&1; then
    grep -v '^WARNING: Location' "$wheels/pip.log" | tail -5 >&2
    die "pip download torch==$version failed"
  fi
  "$PY" - "$wheels" "$DIR" <<'EOF'
import glob, sys, zipfile
wheel, = glob.glob(sys.argv[1] + "/torch-*.whl")
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if n.startswith("torch/include/")
             or n in ("torch/utils/cpp_extension.py", "torch/version.py")]
    z.extractall(sys.argv[2], names)
EOF
  rm -rf "$wheels"
  trap - EXIT
  touch "$DIR/.complete"
fi
TORCH_INC=$DIR/torch/include
have=$(sed -n "s/^__version__ = '\(.*\)'/\1/p" "$DIR/torch/version.py")

# ---------------------------------------------------------------- sources
mapfile -t cpp_srcs < <(find csrc csrc/cuda -maxdepth 1 -type f -name '*.cpp' 2>/dev/null | sort -u)
mapfile -t cu_srcs < <(find csrc/cuda -maxdepth 1 -type f -name '*.cu' 2>/dev/null | sort)
[ ${#cpp_srcs[@]} -gt 0 ] || die "no sources under csrc/"
skipped_cu=""
if [ ${#cu_srcs[@]} -gt 0 ] && [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  [ "${SNAPKV_REQUIRE_CUDA:-0}" != "1" ] || die "SNAPKV_REQUIRE_CUDA=1 but no nvcc at $CUDA_HOME/bin/nvcc"
  skipped_cu=" (${#cu_srcs[@]} .cu skipped: no nvcc at $CUDA_HOME/bin)"
  cu_srcs=()
fi

# ---------------------------------------------------------------- flags, as setup.py + torch V
OBJ=$DIR/obj
[ $clean -eq 0 ] || rm -rf "$OBJ"
mkdir -p "$OBJ"
"$PY" - "$DIR/torch/utils/cpp_extension.py" "$TORCH_INC" "$CUDA_HOME" "$ROOT" "$OBJ" \
    "${TORCH_CUDA_ARCH_LIST:-8.0;9.0}" "$CXX" "${#cpp_srcs[@]}" "${cpp_srcs[@]}" "${cu_srcs[@]}" <<'EOF'
import ast, os, re, shlex, sys, sysconfig
ce_py, inc, cuda_home, root, obj, archs, cxx, n_cpp, *srcs = sys.argv[1:]
cpp, cu = srcs[:int(n_cpp)], srcs[int(n_cpp):]
src = open(ce_py).read()
# What torch V's BuildExtension appends when the extension names no -std (setup.py names none).
m = re.search(r"cpp_flag_prefix \+ '(c\+\+\d+)'", src)
std = "-std=" + (m.group(1) if m else "c++17")
nvcc_common = next(ast.literal_eval(n.value) for n in ast.parse(src).body if isinstance(n, ast.Assign)
                   and any(getattr(t, "id", None) == "COMMON_NVCC_FLAGS" for t in n.targets))
openmp = re.search(r"#define AT_PARALLEL_OPENMP 1", open(os.path.join(inc, "ATen", "Config.h")).read())
py_incs = dict.fromkeys([os.path.join(sys.prefix, "include"), sysconfig.get_path("include"),
                         sysconfig.get_path("platinclude")])
incs = [os.path.join(root, "csrc"), inc, os.path.join(inc, "torch", "csrc", "api", "include"),
        os.path.join(cuda_home, "include"), *py_incs]
common = ["-DSNAPKV_WITH_CUDA", *("-I" + i for i in incs)]
ext = ["-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C", "-D_GLIBCXX_USE_CXX11_ABI=1"]
base = shlex.split(sysconfig.get_config_var("CFLAGS") or "") + shlex.split(sysconfig.get_config_var("CCSHARED") or "")
cflags = base + common
# SNAPKV_COMPAT_FRONTEND=1 (CI): the compilers' front ends only (C++ -fsyntax-only, templates
# instantiated; CUDA to PTX, no ptxas, host -O0), which is where another torch's headers differ;
# code generation is checked by the real builds.
frontend = os.environ.get("SNAPKV_COMPAT_FRONTEND") == "1"
post = ["-O0", "-fsyntax-only"] if frontend else ["-O3"]
post += ["-fopenmp" if openmp else "-fopenmp-simd", "-fno-trapping-math", "-Wall", "-Wno-unknown-pragmas", "-Wno-psabi", *ext, std]
gencode = []
for a in archs.replace(",", ";").replace(" ", ";").split(";"):
    if a:
        n = a.replace(".", "").replace("+PTX", "")
        gencode.append(f"-gencode=arch=compute_{n},code={'compute' if frontend else 'sm'}_{n}")
cuda_post = [*nvcc_common, "--compiler-options", "-fPIC", "-O0" if frontend else "-O3", "-lineinfo", "--expt-relaxed-constexpr",
             *ext, *gencode, std]
q = lambda xs: " ".join(shlex.quote(x).replace("$", "$$") for x in xs)
lines = [f"cxx = {cxx}", f"nvcc = {os.path.join(cuda_home, 'bin', 'nvcc')}",
         f"cflags = {q(cflags)}", f"post_cflags = {q(post)}",
         f"cuda_cflags = {q(common)}", f"cuda_post_cflags = {q(cuda_post)}",
         "rule compile", "  command = $cxx -MMD -MF $out.d $cflags -c $in -o $out $post_cflags",
         "  depfile = $out.d", "  deps = gcc", "  description = c++ $in",
         "rule cuda_compile", "  command = $nvcc -MD -MF $out.d $cuda_cflags -c $in -o $out $cuda_post_cflags",
         "  depfile = $out.d", "  deps = gcc", "  description = nvcc $in"]
for s in cpp:
    lines.append(f"build {obj}/{s}.o: compile {root}/{s}")
for s in cu:
    lines.append(f"build {obj}/{s}.o: cuda_compile {root}/{s}")
with open(os.path.join(obj, "build.ninja"), "w") as f:
    f.write("ninja_required_version = 1.3\n" + "\n".join(lines) + "\n")
print(f"[compat] {std}, nvcc {' '.join(gencode)}", file=sys.stderr)
EOF

# ---------------------------------------------------------------- compile
log "torch $have headers: ${#cpp_srcs[@]} C++ + ${#cu_srcs[@]} CUDA sources, $MAX_JOBS jobs"
status=0
"$NINJA" -C "$OBJ" -k 0 -j "$MAX_JOBS" > "$OBJ/ninja.log" 2>&1 || status=$?
grep -v '^\[[0-9]*/[0-9]*\] \(c++\|nvcc\) \|^ninja: \(Entering\|Leaving\) directory\|^ninja: no work to do' "$OBJ/ninja.log" >&2 || true
mapfile -t failed < <(sed -n "s#^FAILED: \(\[code=[0-9]*\] \)\{0,1\}$OBJ/\(.*\)\.o *\$#\2#p" "$OBJ/ninja.log")
n=$(( ${#cpp_srcs[@]} + ${#cu_srcs[@]} ))
secs=$(( $(date +%s) - t0 ))
if [ $status -eq 0 ]; then
  cached=""
  grep -q '^ninja: no work to do' "$OBJ/ninja.log" && cached=" (objects up to date from an earlier run; --clean recompiles)"
  echo "[compat] torch $have: $n/$n sources compile (${#cpp_srcs[@]} C++, ${#cu_srcs[@]} CUDA)$skipped_cu in ${secs}s$cached: OK"
else
  echo "[compat] torch $have: ${#failed[@]} of $n sources FAILED to compile (${failed[*]:-see the log above}) in ${secs}s"
  exit 1
fi
