"""The counting sort's three launches (cuda/pairs.cu) of two source trees side by side:
``python scripts/pairs_ab.py BASE_SRC [--rounds 3] [--reps 50]``.

Each arm (BASE_SRC, the ``src`` directory of another tree, and this tree's ``src``) runs in a process of its own,
alternating over ``--rounds`` rounds. A process builds causal routing with ``moba_topk`` on random Gaussian q, k
(d 128, B 128, k 8) and times, per chunk, each of the count, scan and scatter launches by CUDA events around it
(the median of ``--reps`` after warm-up), and checks the lists against the stable torch sort. Chunks:

* ``64K``: 4 heads of a 64K sequence in one chunk (2049 keys, 512 tiles), the forward's chunk at 64K;
* ``512K-lo`` / ``512K-hi``: one head, the first / second half of a 512K sequence (4097 keys, 512 tiles each),
  the forward's chunks at 512K.

Printed: per chunk and launch, each arm's median over the rounds (microseconds) and this tree's speedup.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys

K = 1024
HERE = pathlib.Path(__file__).resolve().parents[1] / "src"
KERNELS = ("count", "scan", "scatter")


def _points():
    # name: (seqlen, heads, chunk (h0, n_heads, t0, n_q))
    return {"64K": (64 * K, 4, (0, 4, 0, 64 * K)),
            "512K-lo": (512 * K, 1, (0, 1, 0, 256 * K)),
            "512K-hi": (512 * K, 1, (0, 1, 256 * K, 256 * K))}


def _arm(reps: int) -> list[dict]:
    import torch

    from mobalab.kernels import _cuda_attention as A
    from mobalab.kernels import _pairs as P
    from mobalab.kernels import moba_topk
    from mobalab.kernels._launch import launch

    block, top_k, dim = 128, 8, 128
    rows = []
    topks = {}
    for name, (seqlen, heads, (h0, n_heads, t0, n_q)) in _points().items():
        if (seqlen, heads) not in topks:
            g = torch.Generator(device="cuda").manual_seed(seqlen + heads)
            q, k = (torch.randn(1, seqlen, heads, dim, device="cuda", dtype=torch.bfloat16, generator=g)
                    for _ in range(2))
            topks[seqlen, heads] = moba_topk(q, k, block, top_k, causal=True).to(torch.int32).contiguous()
            del q, k
        topk = topks[seqlen, heads]
        n_blocks = seqlen // block
        chunk = A.Chunk(0, h0, n_heads, t0, n_q)
        n_pairs, n_seg = n_heads * n_q * top_k, n_heads * n_blocks
        scratch = P.counting_scratch(n_pairs, n_seg, "cuda")
        sorted_keys = torch.empty(n_pairs, dtype=torch.int32, device="cuda")
        seg_off = torch.empty(n_seg + 1, dtype=torch.int64, device="cuda")
        tile_cum = torch.empty(n_seg + 1, dtype=torch.int64, device="cuda")
        plans = P.counting_launches(topk, scratch.counts, scratch.seg_total, scratch.ticket, scratch.pairs,
                                    sorted_keys, seg_off, tile_cum, seqlen=seqlen, heads=heads, top_k=top_k,
                                    n_blocks=n_blocks, chunk=chunk, group=1, rows_per_unit=256)
        times = {kname: [] for kname in KERNELS}
        events = [torch.cuda.Event(enable_timing=True) for _ in range(len(plans) + 1)]
        for rep in range(reps + 5):
            scratch.pairs.fill_(-1)
            events[0].record()
            for i, plan in enumerate(plans):
                launch(plan)
                events[i + 1].record()
            torch.cuda.synchronize()
            if rep >= 5:
                for i, kname in enumerate(KERNELS):
                    times[kname].append(events[i].elapsed_time(events[i + 1]) * 1e3)
        want = P.pair_lists_reference(topk, chunk, n_blocks=n_blocks, group=1, top_k=top_k, rows_per_unit=256)
        ok = (torch.equal(scratch.pairs[:n_pairs], want[0]) and torch.equal(sorted_keys, want[1].to(torch.int32))
              and torch.equal(seg_off, want[2]) and torch.equal(tile_cum, want[3]))
        rows.append({"point": name, "keys": n_seg + 1, "tiles": P.n_tiles(n_pairs), "equal": bool(ok),
                     **{kname: statistics.median(v) for kname, v in times.items()}})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base_src", nargs="?")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--arm", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.arm:
        print(json.dumps(_arm(args.reps)))
        return
    arms = {"base": pathlib.Path(args.base_src).resolve(), "this": HERE}
    got = {arm: [] for arm in arms}
    for _ in range(args.rounds):
        for arm, src in arms.items():
            env = dict(os.environ, PYTHONPATH=str(src))
            out = subprocess.run([sys.executable, __file__, "--arm", "--reps", str(args.reps)], env=env,
                                 capture_output=True, text=True, check=True)
            got[arm].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{'point':<9} {'keys':>5} {'tiles':>5} {'launch':<8} {'base us':>9} {'this us':>9} {'x':>6}  equal")
    def med(arm, i, kname):
        return statistics.median(r[i][kname] if kname != "total" else sum(r[i][k] for k in KERNELS)
                                 for r in got[arm])

    for i, row in enumerate(got["this"][0]):
        for kname in (*KERNELS, "total"):
            b, t = med("base", i, kname), med("this", i, kname)
            eq = all(r[i]["equal"] for arm in arms for r in got[arm])
            print(f"{row['point']:<9} {row['keys']:>5} {row['tiles']:>5} {kname:<8} {b:>9.1f} {t:>9.1f} "
                  f"{b / t:>6.2f}  {eq}")


if __name__ == "__main__":
    main()
