#!/usr/bin/env bash
# MoBA attention backward on the device machine, in one call: environment, a smoke check (compute-sanitizer
# on failure), the backward + training GPU tests and the forward GPU tests (nothing broke), the
# forward+backward benchmark. Logs under $OUT (packed into one archive), a short table printed last.
# Usage:  bash scripts/gpu_backward.sh [all|tests|bench] [quick|full|<config indices, e.g. 9,10,11>]
#                                      [pytest -k expression]
set -uo pipefail
source "$(dirname "$0")/_gpu_env.sh"
mkdir -p "$OUT/logs"
LOG="$OUT/logs"
MODE="${1:-all}"
BENCH="${2:-full}"
KEXPR="${3:-}"

{
  echo "date: $(date -u +%F' '%T) UTC   commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown) (+ working tree)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader
  python3 -c "import torch, cupy; print('torch', torch.__version__, '| cupy', cupy.__version__, '| cuda', torch.version.cuda)"
} 2>&1 | tee "$LOG/env.txt"

SMOKE_PY=$(cat <<'PY'
import math, time, torch
from mobalab.kernels import _cuda_attention as A, _cuda_backward as G
from mobalab.kernels.reference import moba_attention_given_routing, moba_topk
torch.manual_seed(0)
for (n, h, hk, d, B, k, causal, dt, det) in [(1000, 4, 2, 128, 64, 4, True, torch.bfloat16, False),
                                             (1000, 4, 4, 64, 16, 8, False, torch.float16, True),
                                             (3000, 8, 1, 128, 256, 4, True, torch.bfloat16, True)]:
    q = torch.randn(2, n, h, d, device="cuda").to(dt)
    kk = torch.randn(2, n, hk, d, device="cuda").to(dt)
    v = torch.randn(2, n, hk, d, device="cuda").to(dt)
    do = torch.randn(2, n, h, d, device="cuda").to(dt)
    idx = moba_topk(q, kk, B, k, causal=causal)
    out, lse = A.moba_attention_cuda(q, kk, v, B, k, causal=causal, return_lse=True, topk_indices=idx)
    t = time.time()
    g = G.moba_attention_backward_cuda(do, q, kk, v, out, lse, idx, B, k, causal, d ** -0.5, deterministic=det)
    torch.cuda.synchronize()
    leaves = [x.float().requires_grad_() for x in (q, kk, v)]
    o, _ = moba_attention_given_routing(*leaves, idx, B, causal)
    ref = torch.autograd.grad((o * do.float()).sum(), leaves)
    errs = " ".join(f"d{nm} {(a.float() - r).abs().max().item():.2e} (|ref| {r.abs().max().item():.2e})"
                    for nm, a, r in zip("qkv", g, ref))
    print(f"smoke N={n} h={h}/{hk} d={d} B={B} k={k} causal={causal} det={det} {dt}: {errs} "
          f"nan {sum(torch.isnan(x).sum().item() for x in g)} ({time.time()-t:.2f}s)", flush=True)
PY
)

status=0
if [ "$MODE" != "bench" ]; then
  timeout 90 python3 -c "$SMOKE_PY" 2>&1 | tee "$LOG/smoke.log"
  smoke_status=${PIPESTATUS[0]}
  if [ "$smoke_status" -ne 0 ] && command -v compute-sanitizer >/dev/null; then
    echo "smoke failed: compute-sanitizer memcheck" | tee -a "$LOG/smoke.log"
    timeout 60 compute-sanitizer --tool memcheck --print-limit 10 python3 -c "$SMOKE_PY" 2>&1 | tail -40 \
      | tee -a "$LOG/smoke.log"
  fi
  args=(-q -p no:cacheprovider -o addopts="" --import-mode=importlib -rfE --maxfail=20 -s)
  [ -n "$KEXPR" ] && args+=(-k "$KEXPR")
  timeout "${TEST_TIMEOUT:-140}" python3 -m pytest "${args[@]}" tests/kernels/test_backward_gpu.py \
    tests/kernels/test_training_gpu.py 2>&1 | tee "$LOG/pytest_backward.log"
  status=${PIPESTATUS[0]}
  timeout 75 python3 -m pytest -q -p no:cacheprovider -o addopts="" --import-mode=importlib -rfE --maxfail=10 \
    tests/kernels/test_attention_gpu.py 2>&1 | tee "$LOG/pytest_attention.log"
fi

if [ "$MODE" != "tests" ]; then
  bench_mode=""
  [ "$BENCH" = "quick" ] && bench_mode="--quick"
  [[ "$BENCH" =~ ^[0-9,]+$ ]] && bench_mode="--select $BENCH"
  timeout "${BENCH_TIMEOUT:-130}" python3 -m mobalab.bench.attention --backward $bench_mode --out "$LOG" 2>&1 \
    | tee "$LOG/bench_bwd.log"
fi

tar -czf "$OUT/gpu_backward_logs.tar.gz" -C "$OUT" logs && rm -rf "$LOG"
echo "================ summary ================"
tar -xzOf "$OUT/gpu_backward_logs.tar.gz" logs/smoke.log 2>/dev/null | grep -E "^smoke|Error|error" | head -12
tar -xzOf "$OUT/gpu_backward_logs.tar.gz" logs/pytest_backward.log 2>/dev/null | grep -E "^(FAILED|ERROR)|passed|failed" | head -25
tar -xzOf "$OUT/gpu_backward_logs.tar.gz" logs/pytest_attention.log 2>/dev/null | grep -E "passed|failed" | tail -3
tar -xzOf "$OUT/gpu_backward_logs.tar.gz" logs/bench_bwd_table.md 2>/dev/null
exit "$status"
