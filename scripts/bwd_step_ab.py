"""Side-by-side timing of two backward settings over a whole step: ``python scripts/bwd_step_ab.py --compare ...``.

Each point (N, head dim, block size; batch 2, 16 heads, k 8, causal, bf16, random Gaussian q, k, v, dO) times
``torch.autograd.grad(moba_attention(q, k, v), (q, k, v), dO)`` with the setting on and off, alternating over
``--rounds`` rounds (the first two dropped), each step timed by CUDA events from an idle GPU. ``--compare``:

* ``lists``: the forward's key-block lists kept for the backward (read as they are, or gathered where the
  forward's chunks split the heads finer) against lists the backward builds itself;
* ``order``: the "block" backward's segments longest first (where it applies: up to 16 waves of CTAs) against
  segment order everywhere.

Printed per point: each arm's median in ms, the speedup of "on" over "off", and whether dK and dV are
bit-identical between the arms (both settings leave every dK / dV sum in the same order; dQ's float atomics
do not).
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

import mobalab.kernels._cuda_backward as G
import mobalab.kernels.autograd as AG
from mobalab.bench._interleaved import idle_gpu_ms, interleaved_times
from mobalab.kernels import moba_attention

K = 1024
POINTS = {"8K": (8 * K, 128, 128), "16K": (16 * K, 128, 128), "64K": (64 * K, 128, 128),
          "16K-d64-B64": (16 * K, 64, 64), "8K-d64-B64": (8 * K, 64, 64)}
COMPARES = ("lists", "order")


def _switch(compare: str):
    """A function that turns the setting on (True) or off (False) in this process."""
    if compare == "lists":
        kept = AG._lists_numel
        return lambda on: setattr(AG, "_lists_numel", kept if on else (lambda *a: 0))
    ordered = G.orders_longest_first
    return lambda on: setattr(G, "orders_longest_first", ordered if on else (lambda *a: False))


def run_point(seqlen: int, dim: int, block: int, compare: str, rounds: int, seed: int = 0) -> list[dict]:
    """One point's rows: arm, median ms, speedup of "on" over "off", dK / dV equal between the arms."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v, dout = (torch.randn(2, seqlen, 16, dim, device="cuda", dtype=torch.bfloat16, generator=g)
                     for _ in range(4))
    leaves = [x.requires_grad_() for x in (q, k, v)]
    switch = _switch(compare)

    def step(on):
        switch(on)
        try:
            return torch.autograd.grad(moba_attention(q, k, v, block_size=block, top_k=8), leaves, dout)
        finally:
            switch(True)

    grads = {on: step(on) for on in (False, True)}  # warm-up (compiles), and the gradients compared
    times = interleaved_times({on: on for on in (False, True)}, rounds, lambda on: idle_gpu_ms(lambda: step(on)),
                              drop=2)
    same = all(torch.equal(x, y) for x, y in zip(grads[True][1:], grads[False][1:], strict=True))
    base = statistics.median(times[False])
    return [dict(arm=arm, ms=statistics.median(times[on]), speedup=base / statistics.median(times[on]),
                 dkv_equal=same) for arm, on in (("off", False), ("on", True))]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--compare", required=True, choices=COMPARES)
    p.add_argument("--points", nargs="+", default=["8K", "16K", "64K", "16K-d64-B64"], choices=sorted(POINTS))
    p.add_argument("--rounds", type=int, default=16)
    a = p.parse_args(argv)
    if a.rounds < 3:
        p.error(f"--rounds must be at least 3 (the first two are dropped), got {a.rounds}")
    if not torch.cuda.is_available():
        print("bwd_step_ab: needs a CUDA GPU", file=sys.stderr)
        return 2
    print(f"{a.compare}: forward + backward step, off against on\n")
    print("| point | arm | ms | speedup | dK, dV equal |\n|---|---|---|---|---|")
    for name in a.points:
        for row in run_point(*POINTS[name], a.compare, a.rounds):
            print(f"| {name} | {row['arm']} | {row['ms']:.3f} | {row['speedup']:.3f} | {row['dkv_equal']} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
