#!/usr/bin/env bash
# Everything mobalab needs a GPU for, in one call on the device machine (see RESULTS.md for the records):
#   1. environment line (GPU, driver, torch, cupy),
#   2. the GPU tests (pytest -m gpu),
#   3. the kernel benchmark and the Monte Carlo throughput benchmark,
# logs and CSVs under $OUT (default ./out), a short table printed last.
# Usage on the device machine:  bash scripts/gpu_check.sh [--quick]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out}"
W="$OUT/logs"          # everything lands here and is packed into $OUT/gpu_check.tgz (8 files come back)
mkdir -p "$W"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg
export CUPY_CACHE_DIR="${CUPY_CACHE_DIR:-/tmp/mobalab-cupy-cache}"
QUICK="${1:-}"

{
  echo "date: $(date -u +%F' '%T) UTC   commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, cupy; print('torch', torch.__version__, '| cupy', cupy.__version__, '| cuda', torch.version.cuda)"
} 2>&1 | tee "$W/env.txt"

# only the files that hold GPU tests: the others import test-only packages (hypothesis) the image may lack
gpu_tests=$(grep -rl "pytest.mark.gpu" tests | sort)
timeout 420 python3 -m pytest -m gpu -q -p no:cacheprovider -o addopts="" --import-mode=importlib $gpu_tests 2>&1 \
  | tee "$W/pytest_gpu.log"
gpu_status=${PIPESTATUS[0]}

timeout 300 python3 -m mobalab.kernels.bench $QUICK --out "$W" 2>&1 | tee "$W/bench.log"
timeout 120 python3 benchmarks/mc_throughput.py --min-seconds 1 --csv "$W/mc_throughput.csv" 2>&1 | tee "$W/mc_throughput.log"
# the main experiment's full configuration: its vector leg runs on the GPU here
timeout 180 python3 -m mobalab.cli run snr-vs-accuracy ${QUICK:+--quick} --no-progress --out "$W/snr-vs-accuracy" 2>&1 \
  | tee "$W/snr-vs-accuracy.log"

tar czf "$OUT/gpu_check.tgz" -C "$W" .
cp "$W/snr-vs-accuracy/snr-vs-accuracy.png" "$OUT/" 2>/dev/null
echo "================ summary ================"
cat "$W/env.txt"
tail -n 3 "$W/pytest_gpu.log"
[ -f "$W/bench_table.md" ] && cat "$W/bench_table.md"
tail -n 14 "$W/mc_throughput.log"
tail -n 12 "$W/snr-vs-accuracy.log"
rm -rf "$W"
exit "$gpu_status"
