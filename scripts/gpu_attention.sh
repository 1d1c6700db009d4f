#!/usr/bin/env bash
# MoBA attention forward on the device machine, in one call: environment, a smoke run (compute-sanitizer
# on failure), the attention GPU tests, the benchmark. Logs and CSVs under $OUT (default ./out), a short
# table printed last.
# Usage:  bash scripts/gpu_attention.sh [--quick|--full|--bench-only|--tests-only] [pytest -k expression]
set -uo pipefail
source "$(dirname "$0")/_gpu_env.sh"
mkdir -p "$OUT"
MODE="${1:---quick}"
KEXPR="${2:-}"

{
  echo "date: $(date -u +%F' '%T) UTC   commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader
  python3 -c "import torch, cupy; print('torch', torch.__version__, '| cupy', cupy.__version__, '| cuda', torch.version.cuda)"
  python3 -m pytest --version
} 2>&1 | tee "$OUT/env.txt"

SMOKE_PY=$(cat <<'PY'
import math, time, torch
from mobalab.kernels import _cuda_attention as A
from mobalab.kernels.reference import moba_attention_given_routing, moba_topk
torch.manual_seed(0)
for (n, h, hk, d, B, k, causal, dt) in [(1000, 4, 2, 128, 64, 4, True, torch.bfloat16),
                                        (1000, 4, 4, 64, 16, 8, False, torch.float16),
                                        (4097, 8, 1, 128, 128, 8, True, torch.bfloat16)]:
    q = torch.randn(2, n, h, d, device="cuda").to(dt)
    kk = torch.randn(2, n, hk, d, device="cuda").to(dt)
    v = torch.randn(2, n, hk, d, device="cuda").to(dt)
    idx = moba_topk(q, kk, B, k, causal=causal)
    t = time.time()
    out, lse = A.moba_attention_cuda(q, kk, v, B, k, causal=causal, return_lse=True, topk_indices=idx)
    torch.cuda.synchronize()
    ref, rl = moba_attention_given_routing(q.float(), kk.float(), v.float(), idx, B, causal)
    print(f"smoke N={n} h={h}/{hk} d={d} B={B} k={k} causal={causal} {dt}: err {(out.float()-ref).abs().max().item():.3e}"
          f" lse {(lse-rl).abs().max().item():.3e}"
          f" nan {torch.isnan(out).sum().item()} ({time.time()-t:.2f}s)", flush=True)
PY
)

if [ "$MODE" != "--bench-only" ]; then
  python3 -c "$SMOKE_PY" 2>&1 | tee "$OUT/smoke.log"
  smoke_status=${PIPESTATUS[0]}
  if [ "$smoke_status" -ne 0 ] && command -v compute-sanitizer >/dev/null; then
    echo "smoke failed: compute-sanitizer memcheck" | tee -a "$OUT/smoke.log"
    timeout 240 compute-sanitizer --tool memcheck --print-limit 20 python3 -c "$SMOKE_PY" 2>&1 | tail -60 \
      | tee -a "$OUT/smoke.log"
    echo "smoke with the streaming tile kernel:" | tee -a "$OUT/smoke.log"
    MOBALAB_ATTN_VARIANT=streaming python3 -c "$SMOKE_PY" 2>&1 | tee -a "$OUT/smoke.log"
    if [ "${PIPESTATUS[0]}" -eq 0 ]; then
      BENCH_VARIANT=streaming smoke_status=0
      echo "benchmark falls back to the streaming kernel" | tee -a "$OUT/smoke.log"
    fi
  fi
  args=(-m gpu -q -p no:cacheprovider -o addopts="" --import-mode=importlib --timeout=300 -rfE --maxfail=15)
  [ -n "$KEXPR" ] && args+=(-k "$KEXPR")
  timeout "${TEST_TIMEOUT:-240}" python3 -m pytest "${args[@]}" tests/kernels/test_attention_gpu.py 2>&1 | tee "$OUT/pytest_attention.log"
  test_status=${PIPESTATUS[0]}
else
  test_status=0
  smoke_status=0
fi

if [ "$MODE" != "--tests-only" ] && [ "$smoke_status" -eq 0 ]; then
  [ -n "${BENCH_VARIANT:-}" ] && export MOBALAB_ATTN_VARIANT="$BENCH_VARIANT"
  bench_mode=""
  [ "$MODE" = "--quick" ] && bench_mode="--quick"
  python3 -m mobalab.bench.attention $bench_mode --out "$OUT" 2>&1 | tee "$OUT/bench.log"
fi

echo "================ summary ================"
cat "$OUT/smoke.log" 2>/dev/null | grep -E "^smoke|Error|error" | head -12
tail -n 25 "$OUT/pytest_attention.log" 2>/dev/null | grep -E "passed|failed|FAILED|ERROR" | head -20
[ -f "$OUT/bench_table.md" ] && cat "$OUT/bench_table.md"
exit "$test_status"
