"""Time the fused top-k kernel of the MoBA router per variant (mma.sync topk.cu: "mma" and "split"; wgmma
topk_wgmma.cu: "wgmma").

Usage: python scripts/bench_router.py [--lengths 8192,65536] [--variants mma,split,wgmma] [--block-size 128]
       [--head-dim 128] [--out DIR]

A variant may name build options after a "+" (``mma+NAME=VALUE``): its kernel compiled with those defines.

Per (sequence length, variant): the top-k launch alone (centroids and hi/lo halves prepared once), timed by
`mobalab.bench.attention.time_ms` (CUDA events on torch's current stream, median of >= 10 reps after 3
warm-ups); batch 2, 16 heads, d 128 (or --head-dim), B 128 (or --block-size), k 8, causal, bf16, random normal
inputs. "mma" runs first, as the baseline of the speedups, and every variant's selections are compared with its
(slots that differ: none for "split" and for build options that keep mma's scores; only near-ties for wgmma, see
tests/kernels/test_routing_gpu.py).
Useful TFLOP/s: 2 b h d per (query, candidate block) score. Writes router_table.md under --out and prints it.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from mobalab.bench.attention import time_ms
from mobalab.kernels import _cuda_routing as routing
from mobalab.kernels._launch import launch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", default="8192,65536")
    p.add_argument("--variants", default=",".join(routing.ROUTER_VARIANTS),
                   help="router variants, comma-separated; mma is always timed first (the baseline)")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--head-dim", type=int, default=128, choices=(32, 64, 96, 128, 256))
    p.add_argument("--out", default="router_bench")
    args = p.parse_args(argv)
    variants = ["mma"] + [v for v in args.variants.split(",") if v and v != "mma"]
    specs = {v: (v.split("+")[0], tuple(v.split("+")[1:])) for v in variants}  # (router variant, defines)
    unknown = sorted({name for name, _ in specs.values()} - set(routing.ROUTER_VARIANTS))
    if unknown:
        p.error(f"--variants: unknown {unknown}; known {routing.ROUTER_VARIANTS}, each optionally +DEFINE=VALUE...")
    b, h, d, bs, top_k, causal = 2, 16, args.head_dim, args.block_size, 8, True
    lines = [f"router top-k kernel on {torch.cuda.get_device_name()} (b={b}, h={h}, d={d}, B={bs}, k={top_k}, "
             "causal, bf16; median ms)", "",
             "| N | variant | top-k ms | useful TFLOP/s | speedup vs mma | slots differing from mma |",
             "|---|---|---|---|---|---|"]
    status = 0
    for seqlen in (int(x) for x in args.lengths.split(",")):
        gen = torch.Generator(device="cuda").manual_seed(seqlen)
        q = torch.randn((b, seqlen, h, d), generator=gen, device="cuda").to(torch.bfloat16)
        k = torch.randn((b, seqlen, h, d), generator=gen, device="cuda").to(torch.bfloat16)
        n = math.ceil(seqlen / bs)
        cent = torch.empty((b, n, h, d), device="cuda")
        hi = torch.empty((b, h, n, d), dtype=torch.bfloat16, device="cuda")
        lo = torch.empty_like(hi)
        launch(routing.centroid_launch(k, cent, hi, lo, bs))
        useful = 2.0 * b * h * d * sum(t // bs for t in range(seqlen))
        outs, base = {}, None
        for variant in variants:
            out = torch.full((b, seqlen, h, top_k), -7, dtype=torch.int32, device="cuda")
            try:
                name, defines = specs[variant]
                plan = routing.topk_launch(q, hi, lo, out, bs, top_k, causal, variant=name, defines=defines)
                ms, _ = time_ms(lambda plan=plan: launch(plan), budget_s=0.2, min_reps=10, warmup=3)
            except Exception as exc:  # noqa: BLE001 - report and go on with the other variant
                print(f"FAILED {variant} at N={seqlen}: {exc}")
                lines.append(f"| {seqlen} | {variant} | failed | | | |")
                status = 1
                continue
            outs[variant] = out
            base = ms if variant == "mma" else base
            diff = "" if variant == "mma" or "mma" not in outs else str(int((out != outs["mma"]).sum()))
            if specs[variant][0] == "split" and diff not in ("", "0"):  # mma's scores: the same selections
                print(f"FAILED split at N={seqlen}: {diff} slots differ from mma")
                status = 1
            speed = f"{base / ms:.2f}" if base else ""
            lines.append(f"| {seqlen} | {variant} | {ms:.3f} | {useful / ms / 1e9:.0f} | {speed} | {diff} |")
        del q, k, cent, hi, lo, outs
        torch.cuda.empty_cache()
    table = "\n".join(lines) + "\n"
    print(table)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "router_table.md").write_text(table)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
