#!/usr/bin/env bash
# The full (non-quick) experiments whose legs need the GPU, in one device call: snr-vs-accuracy (vector and
# kernel legs on CUDA), needle-retrieval (CUDA kernel, 4K..1M), block-size (vector leg on CUDA).
# Each writes CSV + JSON + PNG; everything is packed into $OUT/experiments.tgz, the PNGs are copied to $OUT.
# Usage on the device machine:  bash scripts/gpu_experiments.sh [experiment ...]
set -uo pipefail
source "$(dirname "$0")/_gpu_env.sh"
W="$OUT/exp"
mkdir -p "$W"
EXPS=("$@")
[ ${#EXPS[@]} -eq 0 ] && EXPS=(snr-vs-accuracy needle-retrieval block-size)
declare -A LIMIT=([snr-vs-accuracy]=150 [needle-retrieval]=300 [block-size]=150 [key-conv]=300)

nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$W/env.txt"
for e in "${EXPS[@]}"; do
  start=$(date +%s)
  timeout "${LIMIT[$e]:-200}" python3 -m mobalab.cli run "$e" --no-progress --out "$W/$e" > "$W/$e.log" 2>&1
  echo "$e: exit $? in $(( $(date +%s) - start )) s" | tee -a "$W/status.txt"
  cp "$W/$e/$e.png" "$OUT/" 2>/dev/null
done
tar czf "$OUT/experiments.tgz" -C "$W" .
echo "================ summary ================"
cat "$W/status.txt"
for e in "${EXPS[@]}"; do echo "--- $e"; tail -n 14 "$W/$e.log"; done
rm -rf "$W"
