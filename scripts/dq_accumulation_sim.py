"""Does adding dQ straight into a 16-bit dQ keep the gradient criterion? A CPU simulation on random Gaussian inputs.

``python scripts/dq_accumulation_sim.py [--seeds 3] [--quick]``

The backward's atomic dQ is a sum over a row's selected key blocks j of one contribution per block,

.. math:: dQ_t = \\textstyle\\sum_j c_{t,j}, \\qquad c_{t,j} = \\sigma\\, \\mathrm{T}(dS_{t,j})\\, K_j ,

(dS rounded to the input type T as the kernels' MMAs take it, the product in fp32). Added into an fp32 accumulator and
cast once, dQ takes one rounding to T; added by 16-bit reductions straight into the T result (the "wgmma" kernel's
``_dq16`` form), each contribution is rounded to T and each partial sum too, in whatever order the blocks land:
:math:`a \\leftarrow \\mathrm{T}(a + \\mathrm{T}(c_{t,j}))` with the blocks in a random order here. For each shape this
prints the largest error of both forms against the fp32 oracle's dQ (autograd through the reference in fp32) as a
multiple of the largest error of the same computation in plain torch in T (the GPU tests' criterion allows 3x;
``oracle_dq`` and ``lowp_dq`` compute it as tests/kernels/conftest.py's GpuOracle does).
"""

from __future__ import annotations

import argparse
import math

import torch

from mobalab.kernels.reference import moba_attention_given_routing, moba_topk

SHAPES = [  # seqlen, block, top_k, dtype
    (2048, 128, 8, torch.bfloat16), (1024, 64, 8, torch.bfloat16), (4096, 128, 8, torch.bfloat16),
    (1000, 128, 3, torch.bfloat16), (2048, 128, 8, torch.float16), (1024, 64, 8, torch.float16),
]


def _round(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.to(dtype).float()


def routed_mask(topk: torch.Tensor, block: int) -> torch.Tensor:
    """(batch, heads, N, N) bool: key s is attended by query t (the routing's blocks, token-causal)."""
    batch, n, heads, _ = topk.shape
    n_blocks = math.ceil(n / block)
    chosen = torch.zeros(batch, n, heads, n_blocks + 1, dtype=torch.bool)
    chosen.scatter_(-1, torch.where(topk >= 0, topk, n_blocks).long(), True)
    keys = torch.arange(n)
    mask = chosen[..., keys // block] & (keys.view(1, -1) <= keys.view(-1, 1)).view(1, n, 1, n)
    return mask.permute(0, 2, 1, 3)


def oracle_dq(q, k, v, dout, topk, block) -> torch.Tensor:
    """dQ by autograd through the reference in fp32 from the same inputs."""
    leaves = [x.detach().float().requires_grad_() for x in (q, k, v)]
    out, _ = moba_attention_given_routing(*leaves, topk, block, causal=True)
    return torch.autograd.grad((out * dout.float()).sum(), leaves[0])[0]


def lowp_dq(q, k, v, dout, topk, block) -> torch.Tensor:
    """dQ of plain torch in the input type: a dense softmax masked to the routed tokens, scores and P @ V as matmuls
    in that type, softmax in fp32, probabilities rounded."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    qh, kh, vh = (x.transpose(1, 2) for x in leaves)
    s = (qh @ kh.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
    s = s.masked_fill(~routed_mask(topk, block), float("-inf"))
    o = torch.exp(s - torch.logsumexp(s, dim=-1, keepdim=True)).to(vh.dtype) @ vh
    return torch.autograd.grad((o.transpose(1, 2).float() * dout.float()).sum(), leaves[0])[0].float()


def dq_two_ways(q, k, v, dout, topk, block, gen):
    """(dQ from an fp32 accumulator cast once, dQ summed in the input type in a random block order), fp32."""
    dtype, (_, n, _, d) = q.dtype, q.shape
    scale = d ** -0.5
    qf, kf, vf, dof = (x.float() for x in (q, k, v, dout))
    s = torch.einsum("bthd,bshd->bhts", qf, kf) * scale
    s = s.masked_fill(~routed_mask(topk, block), float("-inf"))
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
            ref, low = oracle_dq(q, k, v, dout, topk, block), lowp_dq(q, k, v, dout, topk, block)
            cast, summed = dq_two_ways(q, k, v, dout, topk, block, g)
            e_low, e_cast, e_sum = ((x - ref).abs().max().item() for x in (low, cast, summed))
            print(f"| {n} | {block} | {top_k} | {str(dtype)[6:]} | {seed} | {e_low:.3e} | {e_cast:.3e} "
                  f"({e_cast / e_low:.2f}) | {e_sum:.3e} ({e_sum / e_low:.2f}) |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
