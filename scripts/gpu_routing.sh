#!/usr/bin/env bash
# MoBA routing kernels (centroids.cu, topk.cu) on the device machine, in one call:
#   1. environment line, 2. GPU tests of the routing stage, 3. timings, with logs under $OUT and a short
#   table printed last.
# Usage: bash scripts/gpu_routing.sh [all|test|bench]
#
# Timings: CUDA events on torch's current stream, median of >= 20 reps after 3 warm-ups, random normal
# inputs (bf16, MHA); "topk": the fused top-k kernel alone, "api": moba_topk_cuda end to end (centroids
# with hi/lo split + top-k + allocations). FLOPs: "useful" = 2*b*h*d * (number of (query, candidate block)
# scores), one q.c product per score; "mma" = what the tensor cores issue: hi and lo halves (x2), whole
# 128 x 64 tiles.
set -uo pipefail
source "$(dirname "$0")/_gpu_env.sh"
mkdir -p "$OUT"
export ROUTING_STATS_FILE="$OUT/routing_stats.txt"
MODE="${1:-all}"
rm -f "$ROUTING_STATS_FILE"
status=0

{
  echo "date: $(date -u +%F' '%T) UTC   commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  python3 -c "import torch, cupy; print('torch', torch.__version__, '| cupy', cupy.__version__, '| cuda', torch.version.cuda)"
  python3 -m pytest --version
} 2>&1 | tee "$OUT/env.txt"

if [ "$MODE" = all ] || [ "$MODE" = test ]; then
  timeout 300 python3 -m pytest -q -p no:cacheprovider -o addopts="" --import-mode=importlib -rfE \
    --durations=5 tests/kernels/test_routing_gpu.py tests/kernels/test_routing_cpu.py 2>&1 \
    | tee "$OUT/pytest_routing.log"
  status=${PIPESTATUS[0]}
fi

if [ "$MODE" = all ] || [ "$MODE" = bench ]; then
  python3 - <<'EOF' 2>&1 | tee "$OUT/bench_routing.log"
import math
import statistics

import torch

from mobalab.kernels import _cuda_routing as routing
from mobalab.kernels._launch import launch

torch.backends.cuda.matmul.allow_tf32 = False
dev = torch.cuda.get_device_name()


def timed(fn, reps=20, warm=3, min_ms=300.0):
    for _ in range(warm):
        fn()
    times, total = [], 0.0
    while len(times) < reps or total < min_ms:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
        total += times[-1]
        if len(times) >= 200:
            break
    return statistics.median(times)


# ceiling on this device: a large bf16 matrix product through torch (cuBLAS, wgmma)
x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
mm_ms = timed(lambda: x @ x, reps=10)
print(f"device: {dev}; torch bf16 8192^3 matmul: {2 * 8192**3 / mm_ms / 1e9:.0f} TFLOP/s")
del x

configs = [(8192, 128, True, 8), (65536, 128, True, 8), (131072, 128, True, 8), (65536, 32, True, 8),
           (65536, 64, True, 8), (65536, 256, True, 8), (65536, 128, False, 8), (65536, 128, True, 16),
           (65536, 128, True, 64)]
b, h, d = 2, 16, 128
rows = []
for seqlen, bs, causal, top_k in configs:
    gen = torch.Generator(device="cuda").manual_seed(seqlen + bs)
    q = torch.randn((b, seqlen, h, d), generator=gen, device="cuda").to(torch.bfloat16)
    k = torch.randn((b, seqlen, h, d), generator=gen, device="cuda").to(torch.bfloat16)
    n = math.ceil(seqlen / bs)
    cent = torch.empty((b, n, h, d), device="cuda")
    hi = torch.empty((b, h, n, d), dtype=torch.bfloat16, device="cuda")
    lo = torch.empty_like(hi)
    out = torch.empty((b, seqlen, h, top_k), dtype=torch.int32, device="cuda")
    cplan = routing.centroid_launch(k, cent, hi, lo, bs)
    tplan = routing.topk_launch(q, hi, lo, out, bs, top_k, causal)
    t_cent = timed(lambda: launch(cplan))
    t_topk = timed(lambda: launch(tplan))
    t_api = timed(lambda: routing.moba_topk_cuda(q, k, bs, top_k, causal=causal))
    if causal:
        scores = sum(t // bs for t in range(seqlen))
        tiles = 0
        for m in range(math.ceil(seqlen / routing.TOPK_BM)):
            t_last = min((m + 1) * routing.TOPK_BM, seqlen) - 1
            tiles += math.ceil((t_last // bs) / routing.TOPK_BN)
    else:
        scores = seqlen * n
        tiles = math.ceil(seqlen / routing.TOPK_BM) * math.ceil(n / routing.TOPK_BN)
    useful = 2.0 * b * h * d * scores
    mma = 2.0 * 2.0 * b * h * d * tiles * routing.TOPK_BM * routing.TOPK_BN
    k_bytes = b * seqlen * h * d * 2
    rows.append(dict(N=seqlen, B=bs, K=top_k, causal=causal, cent_ms=t_cent, topk_ms=t_topk, api_ms=t_api,

                     useful_tf=useful / t_topk / 1e9, mma_tf=mma / t_topk / 1e9, useful_gflop=useful / 1e9,
                     cent_gbs=k_bytes / t_cent / 1e6))
    del q, k, cent, hi, lo, out
    torch.cuda.empty_cache()

# small context reference for scale: the torch reference router at 8K (fp32 scores + two sorts)
from mobalab.kernels import reference  # noqa: E402

gen = torch.Generator(device="cuda").manual_seed(1)
q = torch.randn((b, 8192, h, d), generator=gen, device="cuda").to(torch.bfloat16)
k = torch.randn((b, 8192, h, d), generator=gen, device="cuda").to(torch.bfloat16)
ref_ms = timed(lambda: reference.moba_topk(q, k, 128, 8, causal=True), reps=3, warm=1, min_ms=0)

print(f"\nrouting timings on {dev} (b={b}, h={h}, d={d}, bf16, MHA; median ms)")
hdr = (f"{'N':>7} {'B':>4} {'K':>3} {'mode':>6} {'centroid':>9} {'topk':>8} {'api':>8} "
       f"{'useful':>7} {'tf/s':>6} {'mma tf/s':>8} {'cent GB/s':>9}")
print(hdr)
for r in rows:
    print(f"{r['N']:>7} {r['B']:>4} {r['K']:>3} {'causal' if r['causal'] else 'full':>6} {r['cent_ms']:>9.3f} "
          f"{r['topk_ms']:>8.3f} {r['api_ms']:>8.3f} {r['useful_gflop']:>6.0f}G {r['useful_tf']:>6.0f} "
          f"{r['mma_tf']:>8.0f} {r['cent_gbs']:>9.0f}")
print(f"torch reference router (fp32 einsum + sorts) at N=8192, B=128, K=8 causal: {ref_ms:.1f} ms")
EOF
fi

echo "================ summary ================"
[ -f "$OUT/pytest_routing.log" ] && grep -E "passed|failed|error" "$OUT/pytest_routing.log" | tail -n 3
[ -f "$ROUTING_STATS_FILE" ] && cat "$ROUTING_STATS_FILE"
[ -f "$OUT/bench_routing.log" ] && sed -n '/^routing timings/,$p' "$OUT/bench_routing.log"
exit "$status"
