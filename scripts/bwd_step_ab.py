"""Side-by-side timing of two backward settings over a whole step: ``python scripts/bwd_step_ab.py --compare ...``.

Each point (N, head dim, block size, batch: 2 unless named; 16 heads, k 8, causal, bf16, random Gaussian q, k, v,
dO) times
``torch.autograd.grad(moba_attention(q, k, v), (q, k, v), dO)`` with the setting on and off, alternating over
``--rounds`` rounds (the first two dropped), each step timed by CUDA events from an idle GPU (``--queued n``: n steps
issued back to back per timing, their mean). ``--compare``:

* ``lists``: the forward's key-block lists kept for the backward (read as they are, or gathered where the
  forward's chunks split the heads finer) against lists the backward builds itself;
* ``order``: the "block" backward's segments longest first (where it applies: up to 16 waves of CTAs) against
  segment order everywhere;
* ``plan``: the chunk planner (kv groups in chunks of even sizes, a scratch budget of at least 640 MiB) against
  the previous one (chunks of the largest size that fits and a smaller last one, at least 512 MiB);
* ``tpc``: the forward's resident tile kernel with 8 tiles per CTA ("on") against its 4 (``MOBA_TPC``);
* ``sort``: the longest-first order from one ``moba_pairs_longest_first`` launch against ``torch.argsort`` of the
  segment sizes;
* ``eager``: eager calls through the autograd.Function (``mobalab.kernels.autograd.EAGER_FUNCTION``) against the
  custom ops;
* ``fold``: the batch attended as one sequence where that takes fewer chunks (``mobalab.kernels.autograd.FOLD_BATCH``;
  8K, 4x4K, 8x2K and the larger batches at these shapes) against one chunk plan per sequence.

Printed per point: each arm's median in ms, the speedup of "on" over "off", and whether dK and dV are
bit-identical between the arms (both settings leave every dK / dV sum in the same order; dQ's float atomics
do not).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import torch

import mobalab.kernels._cuda_attention as A
import mobalab.kernels._cuda_backward as G
import mobalab.kernels.autograd as AG
from mobalab.bench._interleaved import print_point_rows, time_arms
from mobalab.kernels import moba_attention

K = 1024
# (N, d, B[, batch: 2])
POINTS = {"8K": (8 * K, 128, 128), "16K": (16 * K, 128, 128), "64K": (64 * K, 128, 128),
          "16K-d64-B64": (16 * K, 64, 64), "8K-d64-B64": (8 * K, 64, 64),
          "4x4K": (4 * K, 128, 128, 4), "8x2K": (2 * K, 128, 128, 8), "8x4K": (4 * K, 128, 128, 8),
          "4x8K": (8 * K, 128, 128, 4), "16x2K": (2 * K, 128, 128, 16), "32x1K": (K, 128, 128, 32)}
COMPARES = ("lists", "order", "plan", "tpc", "sort", "eager", "fold")


def _previous_plan(batch, seqlen, heads, kv_heads, head_dim, top_k, budget_bytes, partial):
    """The chunk planner before the even chunk sizes (for ``--compare plan``): whole sequences in chunks of as many
    kv groups as fit, the rest in a smaller last chunk; split query ranges as now."""
    group = heads // kv_heads
    max_q = max(1, budget_bytes // (group * top_k * A.bytes_per_pair(head_dim, partial)))
    if max_q < seqlen:
        return A._plan_chunks.__wrapped__(batch, seqlen, heads, kv_heads, head_dim, top_k, budget_bytes, partial)
    per = max(1, min(kv_heads, max_q // seqlen))
    return tuple(A.Chunk(b, g0 * group, min(per, kv_heads - g0) * group, 0, seqlen)
                 for b in range(batch) for g0 in range(0, kv_heads, per))


def _switch(compare: str):
    """A function that turns the setting on (True) or off (False) in this process."""
    if compare == "lists":
        kept = AG._lists_numel
        return lambda on: setattr(AG, "_lists_numel", kept if on else (lambda *a: 0))
    if compare == "plan":
        planner, floor = A._plan_chunks, A._MIN_BUDGET

        def plan(on):
            A._plan_chunks = planner if on else _previous_plan
            A._MIN_BUDGET = floor if on else 512 << 20
        return plan
    if compare == "tpc":
        real_launch, tpc = A.launch, A.TILES_PER_UNIT

        def launch_with(define):  # the forward's kernels (cuda/attention.cu) built with one more define
            return lambda p: real_launch(dataclasses.replace(p, defines=p.defines + (define,))
                                         if p.source == A.SOURCE else p)

        def tiles(on):
            A.launch, A.TILES_PER_UNIT = (launch_with("MOBA_TPC=8"), 8) if on else (real_launch, tpc)
        return tiles
    if compare == "eager":
        return lambda on: setattr(AG, "EAGER_FUNCTION", on)
    if compare == "fold":
        return lambda on: setattr(AG, "FOLD_BATCH", on)
    if compare == "sort":
        kernel = G.longest_first

        def argsort(seg_off, n_seg):
            sizes = seg_off[1:n_seg + 1] - seg_off[:n_seg]
            return torch.argsort(sizes, descending=True).to(torch.int32)
        return lambda on: setattr(G, "longest_first", kernel if on else argsort)
    ordered = G.orders_longest_first
    return lambda on: setattr(G, "orders_longest_first", ordered if on else (lambda *a: False))


def run_point(seqlen: int, dim: int, block: int, batch: int = 2, *, compare: str, rounds: int, seed: int = 0,
              queued: int = 1) -> list[dict]:
    """One point's rows: arm, median ms, speedup of "on" over "off", dK / dV equal between the arms. ``queued``
    steps are issued back to back per timing (their mean: the host ahead of the GPU after the first)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v, dout = (torch.randn(batch, seqlen, 16, dim, device="cuda", dtype=torch.bfloat16, generator=g)
                     for _ in range(4))
    leaves = [x.requires_grad_() for x in (q, k, v)]
    switch = _switch(compare)

    def step(on):
        switch(on)
        try:
            return torch.autograd.grad(moba_attention(q, k, v, block_size=block, top_k=8), leaves, dout)
        finally:
            switch(True)

    def steps(on):
        for _ in range(queued - 1):
            step(on)
        return step(on)

    grads, ms = time_arms(steps, (False, True), rounds)
    ms = {on: t / queued for on, t in ms.items()}
    same = all(torch.equal(x, y) for x, y in zip(grads[True][1:], grads[False][1:], strict=True))
    return [dict(arm=arm, ms=ms[on], speedup=ms[False] / ms[on], dkv_equal=same)
            for arm, on in (("off", False), ("on", True))]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--compare", required=True, choices=COMPARES)
    p.add_argument("--points", nargs="+", default=["8K", "16K", "64K", "16K-d64-B64"], choices=sorted(POINTS))
    p.add_argument("--rounds", type=int, default=16)
    p.add_argument("--queued", type=int, default=1,
                   help="steps issued back to back per timing, their mean reported (default 1: from an idle GPU)")
    a = p.parse_args(argv)
    if a.rounds < 3:
        p.error(f"--rounds must be at least 3 (the first two are dropped), got {a.rounds}")
    how = "from an idle GPU" if a.queued == 1 else f"mean of {a.queued} issued back to back"
    print(f"{a.compare}: forward + backward step ({how}), off against on\n")
    return print_point_rows(
        "bwd_step_ab", a.points,
        lambda name: run_point(*POINTS[name], compare=a.compare, rounds=a.rounds, queued=a.queued),
        "| point | arm | ms | speedup | dK, dV equal |\n|---|---|---|---|---|",
        lambda name, r: f"| {name} | {r['arm']} | {r['ms']:.3f} | {r['speedup']:.3f} | {r['dkv_equal']} |")


if __name__ == "__main__":
    sys.exit(main())
