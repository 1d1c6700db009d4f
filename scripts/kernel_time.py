"""GPU time by kernel of one MoBA call: ``python scripts/kernel_time.py [--points 8K,64K,64K-B32] [--backward]``.

Each point (N, block size; batch 2, 16 heads, d 128, k 8, causal, bf16, random Gaussian inputs) runs
``mobalab.kernels.moba_attention`` (with ``--backward`` also ``torch.autograd.grad``) three times to warm up, then
once under torch.profiler, and prints the sum of the GPU kernels' own times (no gaps between launches) and each
kernel's time and launch count, largest first.
"""

from __future__ import annotations

import argparse
import sys

import torch

from mobalab.bench.attention import kernel_times, make_inputs

K = 1024
POINTS = {"8K": (8 * K, 128), "16K": (16 * K, 128), "64K": (64 * K, 128), "64K-B64": (64 * K, 64),
          "64K-B32": (64 * K, 32), "512K": (512 * K, 128)}


def _call(n: int, block: int, top_k: int, backward: bool):
    """One MoBA call on the benchmark's random inputs (``make_inputs``: batch 2, N tokens, 16 heads, d 128, bf16)."""
    from mobalab.kernels import moba_attention

    q, k, v = (x.requires_grad_(backward) for x in make_inputs("random", 2, n, 16, 128, torch.bfloat16, 0, block))
    dout = torch.randn_like(q)

    def call():
        if backward:
            out = moba_attention(q, k, v, block, top_k, causal=True)
            torch.autograd.grad(out, (q, k, v), dout)
        else:
            with torch.no_grad():
                moba_attention(q, k, v, block, top_k, causal=True)

    return call


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--points", default="8K,64K,64K-B32", help=f"comma-separated, of {', '.join(POINTS)}")
    p.add_argument("--backward", action="store_true", help="forward + backward (torch.autograd.grad)")
    p.add_argument("--top-k", type=int, default=8)
    args = p.parse_args(argv)
    points = args.points.split(",")
    unknown = [x for x in points if x not in POINTS]
    if unknown:
        p.error(f"unknown points {unknown}; known: {', '.join(POINTS)}")
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    for name in points:
        n, block = POINTS[name]
        times = kernel_times(_call(n, block, args.top_k, args.backward), warmup=3)
        print(f"== {name} (N {n}, B {block}, k {args.top_k}) {'forward + backward' if args.backward else 'forward'}: "
              f"sum {sum(t for t, _ in times.values()):.3f} ms", flush=True)
        for kernel, (ms, count) in times.items():
            print(f"   {ms:8.3f} ms  x{count:<4d} {kernel[:72]}")
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
