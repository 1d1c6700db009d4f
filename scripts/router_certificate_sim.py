"""Would single-MMA router scores with a certificate pay? A CPU simulation on random Gaussian inputs.

``python scripts/router_certificate_sim.py [--blocks 512 2048 4096] [--rows 2048] [--hi bf16 fp16] [--seed 0]``

The routers score :math:`s_{t,j} = q_t\\cdot c_{hi,j} + q_t\\cdot c_{lo,j}` (two MMAs: the fp32 centroid split into
two 16-bit values). Scoring with one 16-bit copy :math:`\\tilde c_j` of the centroid alone halves the MMAs and the
centroid copies; the error is bounded row by row,

.. math:: |s_{t,j} - \\tilde q_t\\cdot\\tilde c_j| \\le M_t
          = \\lVert q_t\\rVert \\max_j \\lVert c_j - \\tilde c_j\\rVert
          + \\lVert q_t - \\tilde q_t\\rVert \\max_j \\lVert\\tilde c_j\\rVert,

(:math:`\\tilde q_t`: q in the MMA's type, clamped to its range; exact for bf16 q in bf16 and, within fp16's normal
range, in fp16), so a row's top-(k-1) is certain when its approximate list holds E entries beyond the k-1 and the
best score outside the list lies more than 2 M_t below the (k-1)-th; the entries within 2 M_t of that boundary then
need exact scores, and the rows that stay undecided an exact pass of their own. ``--hi bf16`` is
:math:`\\tilde c = c_{hi}` (8 significant bits: the relative error 2^-9); ``--hi fp16`` the centroid rounded to
fp16 (11 bits: 2^-12, and the same MMA rate on Hopper). For d 128, B 128, k 8 and rows at uniform causal positions
this prints, per number of candidate blocks and type: M_t against the scores' spread (and the largest error against
M_t, in fp64), the share of rows left undecided for E = 0..8 extra list entries, the entries per row within 2 M_t
of the boundary, and the list offers per row (scores that beat the list's last entry while a row scans its blocks
in descending order, as the kernels do) for lists of k-1+E entries.
"""

from __future__ import annotations

import argparse
import math

import torch

TYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


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


def certificate(q: torch.Tensor, cent: torch.Tensor, own: torch.Tensor, m: int, mma_type: torch.dtype,
                extra: range, offer_extra: tuple[int, ...]) -> dict:
    """Undecided-row shares, boundary entries and offers of rows ``q`` (bf16 values as fp32) scored against
    ``cent`` (fp32) rounded to ``mma_type``; row t scores blocks j < own[t]."""
    big = torch.finfo(mma_type).max  # values beyond the type's range clamped to it (their error counted in M)
    c_t = cent.clamp(-big, big).to(mma_type).float()
    q_t = q.clamp(-big, big).to(mma_type).float()
    cand = torch.arange(cent.shape[0])[None, :] < own[:, None]
    s_t = (q_t @ c_t.T).masked_fill(~cand, -math.inf)
    bound = q.norm(dim=1) * (cent - c_t).norm(dim=1).max() + (q - q_t).norm(dim=1) * c_t.norm(dim=1).max()
    exact = q.double() @ cent.double().T
    spread = exact.float().std(dim=1)
    err = ((exact - s_t.double()).abs().masked_fill(~cand, 0).amax(dim=1) / bound.double()).max().item()
    top = s_t.topk(m + max(extra) + 1, dim=1).values
    a_m = top[:, m - 1]
    undecided = [(top[:, m + e] + bound >= a_m - bound).float().mean().item() for e in extra]
    near = ((s_t >= (a_m - 2 * bound)[:, None]) & (s_t <= (top[:, m] + 2 * bound)[:, None])).sum(1)
    return {"bound_over_spread": (bound / spread).mean().item(), "worst_error_over_bound": err,
            "undecided": undecided,
            "near": near.float().mean().item(),
            "offers": {e: offers(s_t, m + e).mean().item() for e in offer_extra}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, nargs="+", default=[512, 2048, 4096])
    p.add_argument("--rows", type=int, default=2048)
    p.add_argument("--hi", nargs="+", choices=sorted(TYPES), default=["bf16", "fp16"],
                   help="the 16-bit type of the single MMA's centroids (and queries)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    d, bs, k = 128, 128, 8
    m = k - 1
    extra, offer_extra = range(9), (0, 1, 2, 3, 7)
    gen = torch.Generator().manual_seed(args.seed)
    print(f"d {d}, B {bs}, k {k}, {args.rows} rows at uniform causal positions, random Gaussian q and keys")
    for n in args.blocks:
        cent = torch.randn((n, bs, d), generator=gen).mean(1)
        q = torch.randn((args.rows, d), generator=gen).to(torch.bfloat16).float()
        own = torch.randint(m + 1, n, (args.rows,), generator=gen)
        for name in args.hi:
            r = certificate(q, cent, own, m, TYPES[name], extra, offer_extra)
            print(f"{n} blocks, {name}: M / spread {r['bound_over_spread']:.4f} (largest error / M "
                  f"{r['worst_error_over_bound']:.3f}); undecided rows for E = 0..8: "
                  + ", ".join(f"{u:.4f}" for u in r["undecided"])
                  + f"; entries within 2 M of the boundary per row {r['near']:.2f}; offers per row "
                  + ", ".join(f"{o:.1f} (list of {m + e})" for e, o in r["offers"].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
