"""The forward with its routing launched per chunk on a side stream ($MOBALAB_ROUTE_OVERLAP=1) against one routing
launch before the chunks (=0), interleaved in one process on the same inputs: outputs compared bit for bit, then the
median forward time of each mode over alternating rounds (CUDA events, after warm-up; random inputs).

    python scripts/route_overlap_ab.py [--lengths 65536,524288] [--batch 2] [--heads 16] [--reps 10] [--rounds 3]

Prints a Markdown table: length, chunks, ms of each mode, the ratio.
"""
from __future__ import annotations

import argparse
import os
import statistics

import torch

from mobalab.kernels._cuda_attention import default_scratch_budget, moba_attention_cuda, plan_chunks

ENV = "MOBALAB_ROUTE_OVERLAP"


def timed(fn, reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="65536,524288")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    print(f"{torch.cuda.get_device_name()}; batch {args.batch}, {args.heads} heads, d {args.head_dim}, "
          f"B {args.block_size}, k {args.top_k}, causal, bf16")
    print("| N | chunks | one routing launch, ms | routed per chunk, ms | x | same outputs |")
    print("|---|---|---|---|---|---|")
    gen = torch.Generator(device="cuda").manual_seed(0)
    for n in (int(x) for x in args.lengths.split(",")):
        shape = (args.batch, n, args.heads, args.head_dim)
        qkv = [torch.randn(shape, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
        fwd = lambda qkv=qkv: moba_attention_cuda(*qkv, args.block_size, args.top_k, return_lse=True)  # noqa: E731
        chunks = plan_chunks(args.batch, n, args.heads, args.heads, args.head_dim, args.top_k,
                             default_scratch_budget(args.batch, n, args.heads, args.heads, args.head_dim, 2))
        outs = {}
        for mode in ("0", "1"):
            os.environ[ENV] = mode
            outs[mode] = fwd()
            timed(fwd, 2)
        same = all(torch.equal(a, b) for a, b in zip(outs["0"], outs["1"], strict=True))
        del outs
        times = {"0": [], "1": []}
        for _ in range(args.rounds):
            for mode in ("0", "1"):
                os.environ[ENV] = mode
                times[mode] += timed(fwd, args.reps)
        a, b = statistics.median(times["0"]), statistics.median(times["1"])
        print(f"| {n} | {len(chunks)} | {a:.3f} | {b:.3f} | {a / b:.3f} | {same} |", flush=True)
        del qkv, fwd
        torch.cuda.empty_cache()
    os.environ.pop(ENV, None)


if __name__ == "__main__":
    main()
