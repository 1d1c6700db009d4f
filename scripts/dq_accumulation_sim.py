"""Does adding dQ straight into a 16-bit dQ keep the gradient criterion? A CPU simulation on random Gaussian inputs.

``python scripts/dq_accumulation_sim.py [--seeds 3] [--quick]``

The backward's atomic dQ is a sum over a row's selected key blocks j of one contribution per block,

.. math:: dQ_t = \\textstyle\\sum_j c_{t,j}, \\qquad c_{t,j} = \\sigma\\, \\mathrm{T}(dS_{t,j})\\, K_j ,

(dS rounded to the input type T as the kernels' MMAs take it, the product in fp32). Added into an fp32 accumulator and
cast once, dQ takes one rounding to T; added by 16-bit reductions straight into the T result (the "wgmma" kernel's
``_dq16`` form), each contribution is rounded to T and each partial sum too, in whatever order the blocks land:
:math:`a \\leftarrow \\mathrm{T}(a + \\mathrm{T}(c_{t,j}))` with the blocks in a random order here. For each shape this
prints the largest error of both forms against the fp32 oracle's dQ (autograd through the reference in fp32) as a
multiple of the largest error of the same computation in plain torch in T (the GPU tests' criterion, 3x, computed by
tests/kernels/conftest.py's GpuOracle).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from pathlib import Path

import torch

from mobalab.kernels.reference import moba_topk


def _gpu_oracle():
    """tests/kernels/conftest.py's GpuOracle: the criterion's oracle and low-precision computations (its methods take
    CPU tensors too), loaded from its file under a name of its own."""
    here = Path(__file__).resolve().parents[1] / "tests" / "kernels"
    sys.path.insert(0, str(here))  # conftest imports its sibling _background
    spec = importlib.util.spec_from_file_location("mobalab_kernel_tests_conftest", here / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.GpuOracle


G = _gpu_oracle()

SHAPES = [  # seqlen, block, top_k, dtype
    (2048, 128, 8, torch.bfloat16), (1024, 64, 8, torch.bfloat16), (4096, 128, 8, torch.bfloat16),
    (1000, 128, 3, torch.bfloat16), (2048, 128, 8, torch.float16), (1024, 64, 8, torch.float16),
]


def _round(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.to(dtype).float()


def dq_two_ways(q, k, v, dout, topk, block, gen):
    """(dQ from an fp32 accumulator cast once, dQ summed in the input type in a random block order), fp32."""
    dtype, (_, n, _, d) = q.dtype, q.shape
    scale = d ** -0.5
    qf, kf, vf, dof = (x.float() for x in (q, k, v, dout))
    s = torch.einsum("bthd,bshd->bhts", qf, kf) * scale
    s = s.masked_fill(~G._routed_mask(topk, block, True), float("-inf"))
    p = torch.exp(s - torch.logsumexp(s, -1, keepdim=True))
    o = torch.einsum("bhts,bshd->bthd", p, vf)
    delta = (dof * o).sum(-1).permute(0, 2, 1).unsqueeze(-1)  # D per (b, h, t)
    ds = _round(p * (torch.einsum("bthd,bshd->bhts", dof, vf) - delta), dtype)
    contrib = torch.stack([scale * torch.einsum("bhts,bshd->bthd", ds[..., j * block:(j + 1) * block],
                                                kf[:, j * block:(j + 1) * block])
                           for j in range(math.ceil(n / block))])
    acc = torch.zeros_like(contrib[0])
    for j in torch.randperm(contrib.shape[0], generator=gen).tolist():
        acc = _round(acc + _round(contrib[j], dtype), dtype)
    return _round(contrib.sum(0), dtype), acc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="one small shape (N 384, B 64, k 3, bf16)")
    args = ap.parse_args(argv)
    shapes = [(384, 64, 3, torch.bfloat16)] if args.quick else SHAPES
    print("| N | B | k | dtype | seed | torch low-precision error | fp32 accumulator (x) | 16-bit sums (x) |")
    print("|---|---|---|---|---|---|---|---|")
    for n, block, top_k, dtype in shapes:
        for seed in range(args.seeds):
            g = torch.Generator().manual_seed(seed)
            q, k, v, dout = (torch.randn(1, n, 2, 128, generator=g).to(dtype) for _ in range(4))
            topk = moba_topk(q, k, block, top_k, causal=True)
            ref = G.oracle_grads(q, k, v, dout, topk, block, True)[0]
            low = G.lowp_grads(q, k, v, dout, topk, block, True)[0]
            cast, summed = dq_two_ways(q, k, v, dout, topk, block, g)
            e_low, e_cast, e_sum = ((x - ref).abs().max().item() for x in (low, cast, summed))
            print(f"| {n} | {block} | {top_k} | {str(dtype)[6:]} | {seed} | {e_low:.3e} | {e_cast:.3e} "
                  f"({e_cast / e_low:.2f}) | {e_sum:.3e} ({e_sum / e_low:.2f}) |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
