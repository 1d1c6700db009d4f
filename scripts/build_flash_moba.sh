#!/usr/bin/env bash
# Build FlashMoBA (the MoBA paper's CUDA code), an optional benchmark peer, from its source bundle.
#   bash scripts/build_flash_moba.sh [BUNDLE]     default BUNDLE: .peers/flash-moba/fm_bundle.tgz (an ignored folder)
# Extracts to $FM_ROOT (default /tmp/fm), builds the extension with the bundle's build_min.py (sm_90, bf16, d 128,
# causal, top-k <= 16, forward + backward; ~95 s with 16 jobs on an H200) and checks that it imports.
# Log: $FM_ROOT/build.log. Exit status non-zero on any failure. mobalab's adapter
# (src/mobalab/bench/_flash_moba_peer.py) finds the build through MOBALAB_FLASH_MOBA_DIR (default /tmp/fm/flash-moba).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
BUNDLE="${1:-$REPO/.peers/flash-moba/fm_bundle.tgz}"
FM_ROOT="${FM_ROOT:-/tmp/fm}"
LOG="$FM_ROOT/build.log"
[ -f "$BUNDLE" ] || { echo "build_flash_moba: no bundle at $BUNDLE" >&2; exit 1; }
mkdir -p "$FM_ROOT"
tar xzf "$BUNDLE" -C "$FM_ROOT"
SRC="$FM_ROOT/flash-moba"
[ -f "$SRC/build_min.py" ] || { echo "build_flash_moba: $SRC/build_min.py missing after extraction" >&2; exit 1; }
start=$(date +%s)
if ! (cd "$SRC" && MAX_JOBS="${MAX_JOBS:-$(nproc)}" python3 build_min.py) > "$LOG" 2>&1; then
  echo "build_flash_moba: build failed after $(( $(date +%s) - start )) s; last lines of $LOG:" >&2
  tail -n 30 "$LOG" >&2
  exit 1
fi
echo "build_flash_moba: built in $(( $(date +%s) - start )) s (log $LOG)"
export PYTHONPATH="$SRC/build_min:$SRC${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import flash_moba, flash_moba_cuda; print('build_flash_moba: import ok', flash_moba_cuda.__file__)" >> "$LOG" 2>&1 \
  || { echo "build_flash_moba: built but import failed; see $LOG" >&2; tail -n 5 "$LOG" >&2; exit 1; }
echo "import setup (the benchmark adds these itself when MOBALAB_FLASH_MOBA_DIR is the default):"
echo "  export MOBALAB_FLASH_MOBA_DIR=$SRC"
echo "  export PYTHONPATH=$SRC/build_min:$SRC:\$PYTHONPATH"
