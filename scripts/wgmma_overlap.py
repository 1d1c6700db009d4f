"""Timing probes of what a warpgroup can do while its wgmma run (scripts/wgmma_overlap.cu; an H100 / H200).

Usage: python scripts/wgmma_overlap.py [--iters 200] [--out DIR]

Two tables, clocks per round from clock64 in every warp of CTA 0 (averaged over warps and rounds), 132 CTAs
of one per SM:

1. ``overlap_ss``: one or two warpgroups each issue 16 wgmma m64n128k16 from shared memory (the wgmma router's
   chunk), then do some work, then wait: the issue's clocks (how long issuing holds the warpgroup), the work's
   and the wait's, against the same work without MMAs. Work: none, dependent FFMA chains (registers only), a
   row scan of 16 LDS.128 per thread, or the row stored and scanned (STS + LDS, a score tile's round trip).
2. ``pingpong_1`` / ``pingpong_2``: one to four warpgroups each loop {8 or 16 wgmma, wait, register-only FFMA
   work}, no barriers: the tensor pipe's busy share, 512 clocks of MMA per 8 wgmma m64n128k16 at the dense
   rate (~4 KFLOP per clock per SM).

Writes wgmma_overlap.md under --out and prints it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from mobalab.kernels._build import CUDA_DIR

SOURCE = Path(__file__).with_name("wgmma_overlap.cu")
SMS = 132
TILE = 16384  # one 64 x 128 bf16 A tile, 128-byte swizzled
B_TILE = 32768
OVERLAP_SMEM = 4 * TILE + B_TILE + 65536 + 1024
PINGPONG_SMEM = 8 * TILE + B_TILE + 1024
WORKS = ((0, 0, "none"), (1, 64, "FFMA x 64"), (1, 256, "FFMA x 256"), (2, 1, "LDS row"), (2, 4, "LDS row x 4"),
         (3, 1, "STS + LDS row"), (3, 2, "STS + LDS row x 2"))


def _module():
    import cupy as cp

    mod = cp.RawModule(code=SOURCE.read_text(), options=("-std=c++17", "-arch=sm_90a", f"-I{CUDA_DIR}"))
    fns = {}
    for name, smem in (("overlap_ss", OVERLAP_SMEM), ("pingpong_1", PINGPONG_SMEM), ("pingpong_2", PINGPONG_SMEM)):
        f = mod.get_function(name)
        f.max_dynamic_shared_size_bytes = smem
        fns[name] = f
    return fns


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--out", default="wgmma_overlap")
    args = p.parse_args()
    import cupy as cp  # a GPU machine's package: the module itself loads without it (its tests)

    fns = _module()
    out = cp.zeros(16 * 4, dtype=cp.int64)
    sink = cp.zeros(SMS * 512, dtype=cp.float32)
    it = np.int32(args.iters)

    lines = [f"{cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}, {args.iters} rounds, clocks per round",
             "", "| warpgroups | work | issue | work (with MMA) | wait | round | work alone | work slowed by |",
             "|---|---|---|---|---|---|---|---|"]
    for threads in (128, 256):
        for mode, n_work, label in WORKS:
            rows = {}
            for mma in (0, 1):
                a = (np.int32(mode), np.int32(mma), it, np.int32(n_work), out, sink)
                for _ in range(2):  # the first launch warms the module and the clocks
                    fns["overlap_ss"]((SMS,), (threads,), a, shared_mem=OVERLAP_SMEM)
                cp.cuda.Device().synchronize()
                rows[mma] = out.get().reshape(16, 4)[: threads // 32].mean(0) / args.iters
            issue, work, wait, rnd = rows[1]
            alone = rows[0][1]
            lines.append(f"| {threads // 128} | {label} | {issue:.0f} | {work:.0f} | {wait:.0f} | {rnd:.0f} | "
                         f"{alone:.0f} | {work - alone:+.0f} |")
    lines += ["", "| kernel | warpgroups | FFMA rounds | round clocks | issue + wait clocks | tensor busy |",
              "|---|---|---|---|---|---|"]
    for name, h, wgs in (("pingpong_1", 1, (1, 2, 3, 4)), ("pingpong_2", 2, (1, 2))):
        for nwg in wgs:
            for n_work in (0, 1, 2, 4, 8, 16):
                a = (it, np.int32(n_work), out, sink)
                for _ in range(2):
                    fns[name]((SMS,), (128 * nwg,), a, shared_mem=PINGPONG_SMEM)
                cp.cuda.Device().synchronize()
                o = out.get()[: 2 * 4 * nwg].reshape(-1, 2).mean(0) / args.iters
                busy = nwg * h * 8 * 64 / o[0]
                lines.append(f"| {name} | {nwg} | {n_work} | {o[0]:.0f} | {o[1]:.0f} | {busy:.2f} |")
    table = "\n".join(lines) + "\n"
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "wgmma_overlap.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
