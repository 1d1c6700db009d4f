#!/usr/bin/env bash
# Context-parallel MoBA on two GPUs (NCCL) in one call of at most ~270 s: correctness against one GPU and scaling.
#   MOBALAB_COMMIT=<commit> bash scripts/gpu_cp.sh
# Steps (each under a hard timeout; a failed step does not stop the next; estimates from one H200's numbers):
#   smoke     2 ranks, 4 heads (check 8K, time 64K): NCCL, P2P, CUDA kernels compiled     ~40 s  (limit 75)
#   tests     pytest -m gpu tests/distributed (ring-step kernels, kernel router, 3 two-GPU worlds) ~80 s (limit 110)
#   cp2       2 GPUs, contiguous: check 256K against one device, then 1M, 2M, 4M fwd+bwd   ~60 s  (limit 100)
#   single    1 GPU, the same bench at 1M and 2M (2M: the longest that fits one GPU)    ~20 s  (limit 45)
#   plain     1 GPU, the single-device path (moba_attention, no ring) at 1M and 2M      ~20 s  (limit 45)
#             (the summary's one-GPU baseline is the faster of single and plain at the longest length)
#   zigzag    2 GPUs, zigzag layout, 1M, 2M, 4M, no check                               ~25 s  (limit 60)
# CP_STEPS="single zigzag" (for example) runs only those steps. CP_CHECK_LEN (default 256K) is the equality check's
# length in cp2, CP_ZIGZAG_CHECK_LEN (default 0: none) in zigzag; CP_CHECK_EXTRA_S (default 0) seconds are added to
# both steps' limits for a longer check (a 1M check takes about 50 s).
# Limits shrink so that the steps after keep their time: the whole stays under CP_BUDGET_S (default 270 s).
# The early steps keep the limits of the selected later ones among cp2 (100 s) and single (45 s) back: with every
# step a budget under ~330 s cuts the tests before the two-GPU equality worlds (they come last).
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

CP_STEPS=" ${CP_STEPS:-smoke tests cp2 single plain zigzag} "  # which of the steps below run
step() {  # step NAME LIMIT RESERVE COMMAND...: hard timeout min(LIMIT, what is left after RESERVE s kept for the
          # later steps); log to $W/NAME.log; record time and status. A step with under 20 s is skipped.
  local name=$1 limit=$2 reserve=$3; shift 3
  if [[ "$CP_STEPS" != *" $name "* ]]; then echo "$name: not selected (CP_STEPS)" | tee -a "$W/steps.txt"; return; fi
  local left=$(( BUDGET - ($(date +%s) - T0) - reserve ))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 20 ]; then echo "$name: skipped, $limit s left" | tee -a "$W/steps.txt"; return; fi
  local start=$(date +%s)
  timeout -k 5 "$limit" "$@" > "$W/$name.log" 2>&1
  local rc=$?
  echo "$name: rc $rc, $(( $(date +%s) - start )) s (limit $limit s)" | tee -a "$W/steps.txt"
  tail -n 3 "$W/$name.log"
}

reserve() {  # reserve NAME LIMIT ...: the sum of the LIMITs of the NAMEs that CP_STEPS selects
  local total=0
  while [ $# -gt 1 ]; do [[ "$CP_STEPS" == *" $1 "* ]] && total=$(( total + $2 )); shift 2; done
  echo "$total"
}
CP2_S=$(( 100 + ${CP_CHECK_EXTRA_S:-0} )) ZIGZAG_S=$(( 60 + ${CP_CHECK_EXTRA_S:-0} )) SINGLE_S=45
# reserves: cp2 (100 s) and single (45 s) get their time when selected; plain and zigzag what is left
LATE=$(reserve cp2 $CP2_S single $SINGLE_S)
step smoke 75 "$LATE" "${RUN[@]}" --nproc-per-node 2 -m mobalab.distributed.bench "${CONF[@]}" --heads 4 \
  --check-len 8K --lengths 64K --reps 1 --warmup 0 --out "$W/smoke"
step tests 110 "$LATE" python3 -m pytest -m gpu -q -p no:cacheprovider -o addopts="" --import-mode=importlib -rfE \
  tests/distributed
step cp2 $CP2_S "$(reserve single $SINGLE_S)" "${RUN[@]}" --nproc-per-node 2 -m mobalab.distributed.bench "${CONF[@]}" \
  --layout contiguous --check-len "${CP_CHECK_LEN:-256K}" --lengths 1M,2M,4M --reps 2 --warmup 1 --out "$W/cp2"
step single $SINGLE_S 0 "${RUN[@]}" --nproc-per-node 1 -m mobalab.distributed.bench "${CONF[@]}" --layout contiguous \
  --check-len 0 --lengths 1M,2M --reps 2 --warmup 1 --out "$W/single"
step plain 45 0 "${RUN[@]}" --nproc-per-node 1 -m mobalab.distributed.bench "${CONF[@]}" --path single-device \
  --check-len 0 --lengths 1M,2M --reps 2 --warmup 1 --out "$W/plain"
step zigzag $ZIGZAG_S 0 "${RUN[@]}" --nproc-per-node 2 -m mobalab.distributed.bench "${CONF[@]}" --layout zigzag \
  --check-len "${CP_ZIGZAG_CHECK_LEN:-0}" --lengths 1M,2M,4M --reps 2 --warmup 1 --out "$W/zigzag"

runs=(); for d in cp2 zigzag; do [ -d "$W/$d" ] && runs+=("$W/$d"); done
singles=(); for d in single plain; do [ -d "$W/$d" ] && singles+=("$W/$d"); done
python3 -m mobalab.distributed.summary --runs "${runs[@]}" --single "${singles[@]}" > "$W/summary.md" 2>&1
tar czf "$OUT/gpu_cp.tgz" -C "$OUT" cp
echo "================ summary ($(( $(date +%s) - T0 )) s) ================"
cat "$W/env.txt" "$W/steps.txt"
grep -E "^(FAILED|ERROR)|passed|failed" "$W/tests.log" 2>/dev/null | cut -c1-220 | tail -n 12
for d in smoke cp2 single plain zigzag; do
  [ -f "$W/$d/cp_bench_table.md" ] && { echo "--- $d"; cat "$W/$d/cp_bench_table.md"; }
  [ -f "$W/$d/cp_bench_table.md" ] || { echo "--- $d: no table; errors in its log:"
    grep -E "Error|Exception|error:|Timeout|timed out|NCCL WARN" "$W/$d.log" 2>/dev/null | grep -v "elastic/errors" \
      | sort | uniq -c | sort -rn | head -n 8 | cut -c1-300; }
done
cat "$W/summary.md"
