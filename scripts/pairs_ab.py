"""The counting sort's launches (cuda/pairs.cu) of two source trees, or of two sorts of this tree, side by side:
``python scripts/pairs_ab.py BASE_SRC [--rounds 3] [--reps 50]`` or
``python scripts/pairs_ab.py --tiles-ab auto,radix``.

Each arm (BASE_SRC, the ``src`` directory of another tree, and this tree's ``src``; or this tree with each of the
two ``$MOBALAB_PAIR_TILES`` values of ``--tiles-ab``) runs in a process of its own
(``mobalab.bench._interleaved.tree_arm_rows``), in alternating order over ``--rounds`` rounds. A process builds
causal routing with ``moba_topk`` on random Gaussian q, k (d 128, B 128, k 8) and times, per chunk, each of its
launches (count, scan and scatter; six for the two-digit sort) by CUDA events around it (the median of ``--reps``
after warm-up; the launches queued behind a sleep kernel, so that the events time the GPU's work and not the host's
gaps between launches),
and checks the lists against the stable torch sort. The scatter writes the sorted keys too (as the backward's sorts
do; the forward's do not). Chunks (B 128 unless named):

* ``64K``: 4 heads of a 64K sequence in one chunk (2049 keys, 512 tiles), the forward's chunk at 64K;
* ``64K-B32``: the same at B 32 (8193 keys), the forward's chunk at 64K, B 32;
* ``16K-16h``: 16 heads of a 16K sequence (2049 keys, 512 tiles), the shape of the forward's one chunk for a
  batch of two 8K sequences folded into one;
* ``512K-lo`` / ``512K-hi``: one head, the first / second half of a 512K sequence (4097 keys, 256 wide tiles each),
  the forward's chunks at 512K.

Printed: per chunk the launches' total and the scatters', each arm's median over the rounds (microseconds), and
the second arm's speedup; then each arm's launches by name.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics

K = 1024
HERE = pathlib.Path(__file__).resolve().parents[1] / "src"


def _points():
    # name: (seqlen, heads, block, chunk (h0, n_heads, t0, n_q))
    return {"64K": (64 * K, 4, 128, (0, 4, 0, 64 * K)),
            "64K-B32": (64 * K, 4, 32, (0, 4, 0, 64 * K)),
            "16K-16h": (16 * K, 16, 128, (0, 16, 0, 16 * K)),
            "512K-lo": (512 * K, 1, 128, (0, 1, 0, 256 * K)),
            "512K-hi": (512 * K, 1, 128, (0, 1, 256 * K, 256 * K))}


def _sort_kwargs(scratch, tiles: str | None) -> dict:
    """counting_launches' keywords for an arm: the radix scratch wherever the tree has one (its default sort may be
    the two-digit one; a tree from before it has neither the scratch nor the keyword), and the forced sort if any."""
    kwargs = {"radix": scratch.radix} if hasattr(scratch, "radix") else {}
    if tiles is not None:
        kwargs["tiles"] = tiles
    return kwargs


def _arm(reps: int, tiles: str | None) -> list[dict]:
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
                                    n_blocks=n_blocks, chunk=chunk, group=1, rows_per_unit=256,
                                    **_sort_kwargs(scratch, tiles))
        times = [[] for _ in plans]
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
                for i in range(len(plans)):
                    times[i].append(events[i].elapsed_time(events[i + 1]) * 1e3)
        want = P.pair_lists_reference(topk, chunk, n_blocks=n_blocks, group=1, top_k=top_k, rows_per_unit=256)
        ok = (torch.equal(scratch.pairs[:n_pairs], want[0]) and torch.equal(sorted_keys, want[1].to(torch.int32))
              and torch.equal(seg_off, want[2]) and torch.equal(tile_cum, want[3]))
        launches = {}
        for plan, v in zip(plans, times, strict=True):
            kname = plan.kernel.removeprefix("moba_pairs_")
            while kname in launches:  # the two-digit sort's two scans
                kname += "'"
            launches[kname] = statistics.median(v)
        rows.append({"point": name, "keys": n_seg + 1, "equal": bool(ok), "launches": launches,
                     "total": sum(launches.values()),
                     "scatter": sum(t for k, t in launches.items() if "scatter" in k)})
    return rows


def _child(reps: int, tiles: str | None) -> None:
    for row in _arm(reps, tiles):
        print(json.dumps(row), flush=True)


def _run_arm(src: pathlib.Path, reps: int, tiles: str | None) -> list[dict]:
    from mobalab.bench._interleaved import tree_arm_rows

    return tree_arm_rows(__file__, src, ["--reps", reps] + ([] if tiles is None else ["--tiles", tiles]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base", nargs="?", type=pathlib.Path, help="the other tree's src directory")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--tiles-ab", help="two $MOBALAB_PAIR_TILES values of this tree to compare, e.g. auto,radix")
    ap.add_argument("--tiles", help=argparse.SUPPRESS)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _child(args.reps, args.tiles)
        return 0
    if args.tiles_ab is not None:
        names = args.tiles_ab.split(",")
        if len(names) != 2 or args.base is not None:
            ap.error(f"--tiles-ab takes two values, e.g. auto,radix, and no BASE_SRC; got {args.tiles_ab!r}")
        arms = {name: (HERE, name) for name in names}
    elif args.base is None or not (args.base / "mobalab").is_dir():
        ap.error(f"BASE_SRC must be a src directory holding mobalab/, got {args.base}")
    else:
        arms = {"base": (args.base.resolve(), None), "this": (HERE, None)}
    from mobalab.bench._interleaved import interleaved_times

    got = interleaved_times(arms, args.rounds,
                            lambda arm: _run_arm(arm[0], args.reps, arm[1]))
    a, b = arms

    def med(arm, i, field):
        return statistics.median(r[i][field] for r in got[arm])

    print(f"{'point':<9} {'keys':>5} {'part':<8} {a + ' us':>10} {b + ' us':>10} {'x':>6}  equal")
    for i, row in enumerate(got[b][0]):
        eq = all(r[i]["equal"] for runs in got.values() for r in runs)
        for field in ("scatter", "total"):
            ta, tb = med(a, i, field), med(b, i, field)
            print(f"{row['point']:<9} {row['keys']:>5} {field:<8} {ta:>10.1f} {tb:>10.1f} {ta / tb:>6.2f}  {eq}")
    for arm in arms:
        for i, row in enumerate(got[arm][0]):
            parts = ", ".join(f"{k} {statistics.median(r[i]['launches'][k] for r in got[arm]):.1f}"
                              for k in row["launches"])
            print(f"{arm}: {row['point']}: {parts}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
