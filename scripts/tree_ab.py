"""Two source trees' training step side by side: ``python scripts/tree_ab.py BASE_SRC [--points 8K 16K 64K]``.

Changes to the host path (allocations, launch plans, checks) move the step's time from an idle GPU by a few
percent, about as much as it varies between machines with the host's speed, so they are measured against the code
before them on the same machine in one run. BASE_SRC is the ``src`` directory of the other tree (for instance an
older commit's, ``git archive <commit> src | tar -x -C DIR`` gives DIR/src); this tree's ``src`` is the other arm.
Each arm runs in a process of its own (a process holds one ``mobalab``), the two alternating over ``--rounds``
rounds, each process timing every point:

* ``idle``: one step (``moba_attention`` forward, then ``torch.autograd.grad`` of q, k, v) from an idle GPU, CUDA
  events around it, the median of ``--reps``;
* ``queued``: 10 steps issued back to back, the mean per step, the median of 3 such runs;
* ``fwd``: the forward alone (no autograd) from an idle GPU, the median of ``--reps``;
* ``attn``: the attention forward with the routing given (``moba_attention_cuda(..., topk_indices=)``: index
  building, tiles, merge; the routing computed once by this arm), from an idle GPU, the median of ``--reps``: what a
  change to the tile or merge kernels moves, without the router's time.

Inputs: batch 2 (or the point's), 16 heads, d 128, B 128 and k 8 (or the point's block size, with k 8 x 128 / B so
that a query attends as many keys), causal, bf16, random Gaussian q, k, v, dO of a fixed seed. Printed: per point and
timing, each arm's median over the rounds and this tree's speedup.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys

K = 1024
# name: (seqlen, batch, block size)
POINTS = {"8K": (8 * K, 2, 128), "16K": (16 * K, 2, 128), "64K": (64 * K, 2, 128), "8x2K": (2 * K, 8, 128),
          "4x4K": (4 * K, 4, 128), "512K": (512 * K, 2, 128), "8K-B64": (8 * K, 2, 64), "64K-B64": (64 * K, 2, 64)}
TIMINGS = ("idle", "queued", "fwd", "attn")
HERE = pathlib.Path(__file__).resolve().parents[1] / "src"


def _time_point(name: str, reps: int) -> dict:
    import torch

    from mobalab.bench._interleaved import idle_gpu_ms  # the arm's own tree's (both arms have them)
    from mobalab.bench.attention import time_queued_ms
    from mobalab.kernels import moba_attention
    from mobalab.kernels._cuda_attention import moba_attention_cuda
    from mobalab.kernels._cuda_routing import moba_topk_cuda

    seqlen, batch, block = POINTS[name]
    top_k = 8 * 128 // block
    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (batch, seqlen, 16, 128)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
               for _ in range(3))
    dout = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=g)

    def step():
        return torch.autograd.grad(moba_attention(q, k, v, block, top_k, causal=True), (q, k, v), dout)

    def fwd():
        with torch.no_grad():
            return moba_attention(q, k, v, block, top_k, causal=True)

    with torch.no_grad():
        topk = moba_topk_cuda(q, k, block, top_k, causal=True).to(torch.int32).contiguous()

    def attn():
        with torch.no_grad():
            return moba_attention_cuda(q, k, v, block, top_k, True, topk_indices=topk)

    for _ in range(5):
        step()
        fwd()
        attn()
    return {"point": name, "idle": statistics.median(idle_gpu_ms(step) for _ in range(reps)),
            "queued": time_queued_ms(step, steps=10, rounds=3, warmup=0),
            "fwd": statistics.median(idle_gpu_ms(fwd) for _ in range(reps)),
            "attn": statistics.median(idle_gpu_ms(attn) for _ in range(reps))}


def _child(points, reps: int) -> None:
    for name in points:
        print(json.dumps(_time_point(name, reps)), flush=True)


def _run_arm(src: pathlib.Path, points, reps: int) -> dict:
    from mobalab.bench._interleaved import tree_arm_rows

    return {r["point"]: r for r in tree_arm_rows(__file__, src, ["--points", *points, "--reps", reps])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("base", nargs="?", type=pathlib.Path, help="the other tree's src directory")
    p.add_argument("--points", nargs="+", default=["8K", "16K", "64K"], choices=list(POINTS))
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        _child(a.points, a.reps)
        return 0
    if a.base is None or not (a.base / "mobalab").is_dir():
        p.error(f"BASE_SRC must be a src directory holding mobalab/, got {a.base}")
    from mobalab.bench._interleaved import interleaved_times

    def run(src):
        rows = _run_arm(src, a.points, a.reps)
        print(f"{'this' if src == HERE else 'base'} done", file=sys.stderr, flush=True)
        return rows

    runs = interleaved_times({"base": a.base.resolve(), "this": HERE}, a.rounds, run)
    print(f"| point | timing | base ms | this ms | speedup | base range | this range |  (medians over {a.rounds} "
          "processes each, and the processes' spread)")
    print("|---|---|---|---|---|---|---|")
    for point in a.points:
        for t in TIMINGS:
            base, this = ([run[point][t] for run in runs[arm]] for arm in ("base", "this"))
            mb, mt = statistics.median(base), statistics.median(this)
            print(f"| {point} | {t} | {mb:.3f} | {mt:.3f} | {mb / mt:.3f}x | {min(base):.3f}-{max(base):.3f} | "
                  f"{min(this):.3f}-{max(this):.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
