#!/usr/bin/env bash
# Context-parallel MoBA on two GPUs (NCCL) in one call of at most ~270 s: correctness against one GPU and scaling.
#   MOBALAB_COMMIT=<commit> bash scripts/gpu_cp.sh
# Steps (each under a hard timeout; a failed step does not stop the next; estimates from one H200's numbers):
#   smoke     2 ranks, tiny sizes (check 8K, time 64K): NCCL, P2P, CUDA kernels compiled   ~40 s  (limit 100)
#   tests     pytest -m gpu tests/distributed (ring-step kernels, kernel router, 3 two-GPU worlds) ~60 s (limit 100)
#   cp2       2 GPUs, contiguous: check 256K against one device, then 1M, 2M, 4M fwd+bwd   ~60 s  (limit 110)
#   single    1 GPU, the same bench at 1M and 2M (2M: the longest that fits one GPU)    ~20 s  (limit 60)
#   zigzag    2 GPUs, zigzag layout, 1M, 2M, 4M, no check; only if >= 60 s are left    ~25 s  (limit 60)
# Configuration: batch 1, 16 heads, d 128, B 128, k 8, causal, bf16; warm-up 1, 2 timed repetitions.
# Logs and CSVs under $OUT/cp (packed into $OUT/gpu_cp.tgz); the summary table and target lines print last.
set -uo pipefail
source "$(dirname "$0")/_gpu_env.sh"
W="$OUT/cp"
mkdir -p "$W"
BUDGET=${CP_BUDGET_S:-270}
T0=$(date +%s)
RUN=(python3 -m torch.distributed.run --standalone)
CONF=(--backend nccl --batch 1 --heads 16 --head-dim 128 --block-size 128 --top-k 8 --dtype bf16 --timeout 120)
: > "$W/steps.txt"

{
  echo "date: $(date -u +%F' '%T) UTC   commit: ${MOBALAB_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo 'see the calling record')}"
  nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader
  nvidia-smi topo -m 2>/dev/null | head -4
  python3 -c "import torch, cupy; print('torch', torch.__version__, '| cupy', cupy.__version__, '| cuda', torch.version.cuda, '| nccl', torch.cuda.nccl.version(), '| gpus', torch.cuda.device_count())"
} > "$W/env.txt" 2>&1
cat "$W/env.txt"

step() {  # step NAME LIMIT_S COMMAND...: run with a hard timeout, log to $W/NAME.log, record time and status
  local name=$1 limit=$2; shift 2
  local start=$(date +%s)
  timeout -k 5 "$limit" "$@" > "$W/$name.log" 2>&1
  local rc=$?
  echo "$name: rc $rc, $(( $(date +%s) - start )) s (limit $limit s)" | tee -a "$W/steps.txt"
  tail -n 3 "$W/$name.log"
}

step smoke 100 "${RUN[@]}" --nproc-per-node 2 -m mobalab.distributed.bench "${CONF[@]}" --heads 4 \
  --check-len 8K --lengths 64K --reps 1 --warmup 0 --out "$W/smoke"
step tests 100 python3 -m pytest -m gpu -q -p no:cacheprovider -o addopts="" --import-mode=importlib -rfE \
  tests/distributed
step cp2 110 "${RUN[@]}" --nproc-per-node 2 -m mobalab.distributed.bench "${CONF[@]}" --layout contiguous \
  --check-len 256K --lengths 1M,2M,4M --reps 2 --warmup 1 --out "$W/cp2"
step single 60 "${RUN[@]}" --nproc-per-node 1 -m mobalab.distributed.bench "${CONF[@]}" --layout contiguous \
  --check-len 0 --lengths 1M,2M --reps 2 --warmup 1 --out "$W/single"
left=$(( BUDGET - ($(date +%s) - T0) ))
if [ "$left" -ge 60 ]; then
  step zigzag 60 "${RUN[@]}" --nproc-per-node 2 -m mobalab.distributed.bench "${CONF[@]}" --layout zigzag \
    --check-len 0 --lengths 1M,2M,4M --reps 2 --warmup 1 --out "$W/zigzag"
else
  echo "zigzag: skipped, $left s left" | tee -a "$W/steps.txt"
fi

python3 -m mobalab.distributed.summary --runs "$W/cp2" "$W/zigzag" --single "$W/single" > "$W/summary.md" 2>&1
tar czf "$OUT/gpu_cp.tgz" -C "$OUT" cp
echo "================ summary ($(( $(date +%s) - T0 )) s) ================"
cat "$W/env.txt" "$W/steps.txt"
grep -E "^(FAILED|ERROR)|passed|failed" "$W/tests.log" 2>/dev/null | cut -c1-220 | tail -n 12
for d in smoke cp2 single zigzag; do
  [ -f "$W/$d/cp_bench_table.md" ] && { echo "--- $d"; cat "$W/$d/cp_bench_table.md"; }
  [ -f "$W/$d/cp_bench_table.md" ] || { echo "--- $d: no table; log tail:"; tail -n 15 "$W/$d.log" 2>/dev/null | cut -c1-300; }
done
cat "$W/summary.md"
