# Sourced by the scripts/gpu_*.sh device scripts: run from the repository root with the source tree on the
# path (the device image has torch and cupy but mobalab is not installed there), and one kernel cache.
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
OUT="${OUT:-$PWD/out}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg
export CUPY_CACHE_DIR="${CUPY_CACHE_DIR:-/tmp/mobalab-cupy-cache}"
