"""The counting sort's three launches (cuda/pairs.cu) of two source trees side by side:
``python scripts/pairs_ab.py BASE_SRC [--rounds 3] [--reps 50]``.

Each arm (BASE_SRC, the ``src`` directory of another tree, and this tree's ``src``) runs in a process of its own
(``mobalab.bench._interleaved.tree_arm_rows``), in alternating order over ``--rounds`` rounds. A process builds
causal routing with ``moba_topk`` on random Gaussian q, k (d 128, B 128, k 8) and times, per chunk, each of the
count, scan and scatter launches by CUDA events around it (the median of ``--reps`` after warm-up; the launches
queued behind a sleep kernel, so that the events time the GPU's work and not the host's gaps between launches),
and checks the lists against the stable torch sort. The scatter writes the sorted keys too (as the backward's sorts
do; the forward's do not). Chunks (B 128 unless named):

* ``64K``: 4 heads of a 64K sequence in one chunk (2049 keys, 512 tiles), the forward's chunk at 64K;
* ``64K-B32``: the same at B 32 (8193 keys), the forward's chunk at 64K, B 32;
* ``16K-16h``: 16 heads of a 16K sequence (2049 keys, 512 tiles), the shape of the forward's one chunk for a
  batch of two 8K sequences folded into one;
* ``512K-lo`` / ``512K-hi``: one head, the first / second half of a 512K sequence (4097 keys, 256 wide tiles each),
  the forward's chunks at 512K.

Printed: per chunk and launch, each arm's median over the rounds (microseconds) and this tree's speedup.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics

K = 1024
HERE = pathlib.Path(__file__).resolve().parents[1] / "src"
KERNELS = ("count", "scan", "scatter")


def _points():
    # name: (seqlen, heads, block, chunk (h0, n_heads, t0, n_q))
    return {"64K": (64 * K, 4, 128, (0, 4, 0, 64 * K)),
            "64K-B32": (64 * K, 4, 32, (0, 4, 0, 64 * K)),
            "16K-16h": (16 * K, 16, 128, (0, 16, 0, 16 * K)),
            "512K-lo": (512 * K, 1, 128, (0, 1, 0, 256 * K)),
            "512K-hi": (512 * K, 1, 128, (0, 1, 256 * K, 256 * K))}


def _arm(reps: int) -> list[dict]:
    import torch

    from mobalab.kernels import _cuda_attention as A
    from mobalab.kernels import _pairs as P
    from mobalab.kernels import moba_topk
    from mobalab.kernels._launch import launch

    top_k, dim = 8, 128
    rows = []
    topks = {}
    for name, (seqlen, heads, block, (h0, n_heads, t0, n_q)) in _points().items():
        if (seqlen, heads, block) not in topks:
            g = torch.Generator(device="cuda").manual_seed(seqlen + heads)
            q, k = (torch.randn(1, seqlen, heads, dim, device="cuda", dtype=torch.bfloat16, generator=g)
                    for _ in range(2))
            topks[seqlen, heads, block] = moba_topk(q, k, block, top_k, causal=True).to(torch.int32).contiguous()
            del q, k
        topk = topks[seqlen, heads, block]
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
            # the GPU held busy while the host issues the three launches, so the events time the kernels, not the
            # host's launch gaps (a 10-20 us kernel is shorter than the host's path to the next launch)
            torch.cuda._sleep(1_000_000)
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
        # trees before the wide tiles have one tile size, and n_tiles without its argument
        tiles = (P.n_tiles(n_pairs, P.tile_plan(n_pairs, n_seg, n_blocks)[0]) if hasattr(P, "tile_plan")
                 else P.n_tiles(n_pairs))
        rows.append({"point": name, "keys": n_seg + 1, "tiles": tiles, "equal": bool(ok),
                     **{kname: statistics.median(v) for kname, v in times.items()}})
    return rows


def _child(reps: int) -> None:
    for row in _arm(reps):
        print(json.dumps(row), flush=True)


def _run_arm(src: pathlib.Path, reps: int) -> list[dict]:
    from mobalab.bench._interleaved import tree_arm_rows

    return tree_arm_rows(__file__, src, ["--reps", reps])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base", nargs="?", type=pathlib.Path, help="the other tree's src directory")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _child(args.reps)
        return 0
    if args.base is None or not (args.base / "mobalab").is_dir():
        ap.error(f"BASE_SRC must be a src directory holding mobalab/, got {args.base}")
    from mobalab.bench._interleaved import interleaved_times

    got = interleaved_times({"base": args.base.resolve(), "this": HERE}, args.rounds,
                            lambda src: _run_arm(src, args.reps))

    def med(arm, i, kname):
        return statistics.median(r[i][kname] if kname != "total" else sum(r[i][k] for k in KERNELS)
                                 for r in got[arm])

    print(f"{'point':<9} {'keys':>5} {'tiles':>5} {'launch':<8} {'base us':>9} {'this us':>9} {'x':>6}  equal")
    for i, row in enumerate(got["this"][0]):
        eq = all(r[i]["equal"] for runs in got.values() for r in runs)
        for kname in (*KERNELS, "total"):
            b, t = med("base", i, kname), med("this", i, kname)
            print(f"{row['point']:<9} {row['keys']:>5} {row['tiles']:>5} {kname:<8} {b:>9.1f} {t:>9.1f} "
                  f"{b / t:>6.2f}  {eq}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
