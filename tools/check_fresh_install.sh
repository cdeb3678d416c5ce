#!/usr/bin/env bash
# A new user's first install: the README's "Install into your own environment" block, word for
# word, in a fresh virtual environment, on a copy of the tracked files (no .venv, no build
# outputs). The block ends with `snapkv-ext demo`, which must run to its end (exit status 0).
#
#   tools/check_fresh_install.sh        CI runs it after ./run test; about 5 minutes on 2 cores
#
# Around the block, only the environment differs from a user's:
# - SNAPKV_FORCE_CPU=1: CPU kernels only. CI has compiled the CUDA kernels once already (./run);
#   compiling them again here would only make this check longer.
# - PIP_CONSTRAINT pins torch to requirements-dev.txt's version, which the package registry (and
#   the machines' local mirror of it) serves; HF_HUB_OFFLINE=1: nothing from a model hub.
set -euo pipefail
cd "$(dirname "$0")/.."
log() { printf '[fresh-install] %s\n' "$*" >&2; }
start=$SECONDS

# The first ```bash block after the heading, up to its closing fence.
block=$(awk '/^## Install into your own environment/ {h = 1; next}
             h && /^```bash/ {b = 1; next}
             b && /^```/ {exit}
             b' README.md)
if [ -z "$block" ]; then
  log "README.md has no bash block under '## Install into your own environment'"; exit 1
fi
if [ "$(printf '%s\n' "$block" | grep -v '^[[:space:]]*$' | tail -n 1 | sed 's/[[:space:]]*#.*//')" != "snapkv-ext demo" ]; then
  log "README.md's install block does not end with 'snapkv-ext demo'"; exit 1
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/snapkv-fresh.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir "$work/src"
git ls-files -z | xargs -0 cp --parents -t "$work/src"
printf '%s\n' "$block" > "$work/install.sh"
grep -E '^torch==' requirements-dev.txt > "$work/constraints.txt"
python3 -m venv "$work/venv"
log "running README.md's install block in a fresh venv ($(python3 --version), $(cat "$work/constraints.txt")):"
sed 's/^/    /' "$work/install.sh" >&2
set +e
(
  cd "$work/src"
  unset PYTHONPATH
  export VIRTUAL_ENV="$work/venv" PATH="$work/venv/bin:$PATH"
  export PIP_CONSTRAINT="$work/constraints.txt" PIP_QUIET=1 PIP_DISABLE_PIP_VERSION_CHECK=1
  export SNAPKV_FORCE_CPU=1 HF_HUB_OFFLINE=1
  unset SNAPKV_REQUIRE_CUDA  # .ci/run requires the CUDA build above; this CPU-only install must not
  bash -e -x "$work/install.sh"
) 2>&1 | tee "$work/out.log"
status=${PIPESTATUS[0]}
set -e
if [ "$status" != 0 ]; then
  log "FAILED: the README's install block exited with status $status"; exit 1
fi
if ! grep -q "pass key retrieved: full" "$work/out.log"; then
  log "FAILED: snapkv-ext demo did not print its result line"; exit 1
fi
if grep -q 'past_key_values` is deprecated' "$work/out.log"; then
  log "FAILED: the demo passed Transformers' deprecated past_key_values argument"; exit 1
fi
log "ok: README install block and snapkv-ext demo in a fresh venv, $((SECONDS - start)) s"
