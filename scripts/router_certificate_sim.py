"""Would hi-only router scores with a certificate pay? A CPU simulation on random Gaussian inputs.

``python scripts/router_certificate_sim.py [--blocks 512 4096] [--rows 2048] [--seed 0]``

The routers score :math:`s_{t,j} = q_t\\cdot c_{hi,j} + q_t\\cdot c_{lo,j}` (two MMAs: the fp32 centroid split into
two 16-bit values). Scoring with :math:`c_{hi}` alone halves the MMAs and the centroid copies, and
:math:`|q_t\\cdot c_{lo,j}| \\le M_t = \\lVert q_t\\rVert \\max_j \\lVert c_{lo,j}\\rVert` bounds the error, so a row's
top-(k-1) is certain when the hi-only list holds E entries beyond the k-1 and its last one lies more than 2 M_t below
the (k-1)-th; the entries within 2 M_t of the boundary then need their exact scores. For d 128, B 128, k 8 and rows
at uniform causal positions this prints, per number of candidate blocks: M_t against the scores' spread, the share
of rows left undecided for E = 0..8 extra slots, the ambiguous entries per row, and the list offers per row (scores
that beat the list's last entry while a row scans its blocks in descending order, as the kernels do) with a list
of k-1 entries and one of k-1+7.
"""

from __future__ import annotations

import argparse
import math

import torch


def offers(scores: torch.Tensor, cap: int) -> torch.Tensor:
    """Per row: how many scores, visited from the last column to the first, beat the cap-th best seen before
    (every score does while fewer than cap are seen; -inf never does)."""
    rows, n = scores.shape
    best = torch.full((rows, cap), -math.inf)
    count = torch.zeros(rows)
    for j in range(n - 1, -1, -1):
        x = scores[:, j]
        take = x > best[:, -1]
        count += take.float()
        merged = torch.cat((best, x[:, None]), 1).sort(dim=1, descending=True).values[:, :cap]
        best = torch.where(take[:, None], merged, best)
    return count


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, nargs="+", default=[512, 4096])
    p.add_argument("--rows", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    d, bs, k = 128, 128, 8
    m = k - 1
    gen = torch.Generator().manual_seed(args.seed)
    print(f"d {d}, B {bs}, k {k}, {args.rows} rows at uniform causal positions, random Gaussian q and keys")
    for n in args.blocks:
        cent = torch.randn((n, bs, d), generator=gen).mean(1)
        hi = cent.to(torch.bfloat16).float()
        lo = cent - hi
        q = torch.randn((args.rows, d), generator=gen).to(torch.bfloat16).float()
        own = torch.randint(m + 1, n, (args.rows,), generator=gen)
        cand = torch.arange(n)[None, :] < own[:, None]
        s_hi = (q @ hi.T).masked_fill(~cand, -math.inf)
        bound = q.norm(dim=1) * lo.norm(dim=1).max()
        spread = (q @ cent.T).std(dim=1)
        top = s_hi.topk(m + 9, dim=1).values
        a_m = top[:, m - 1]
        undecided = [(top[:, m + e] + bound >= a_m - bound).float().mean().item() for e in range(9)]
        ambiguous = ((s_hi >= (a_m - 2 * bound)[:, None]) & (s_hi <= (top[:, m] + 2 * bound)[:, None])).sum(1)
        o_m, o_e = offers(s_hi, m).mean().item(), offers(s_hi, m + 7).mean().item()
        print(f"{n} blocks: M / spread {(bound / spread).mean():.4f}; undecided rows by extra slots E = 0..8: "
              + ", ".join(f"{u:.4f}" for u in undecided)
              + f"; ambiguous entries per row {ambiguous.float().mean():.2f}; offers per row {o_m:.1f} (list of {m}),"
              f" {o_e:.1f} (list of {m + 7})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
