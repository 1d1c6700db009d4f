"""Where FlashMoBA's routing departs from mobalab's: its centroid pass against the fp32 block mean, on one GPU.

Usage: python scripts/flash_moba_centroids.py [--seq-len 65536] [--block-size 128]
(FlashMoBA built by ``bash scripts/build_flash_moba.sh``, its exports in the environment)

Batch 2, 16 heads, d 128, k 8, causal, bf16, random normal inputs. Prints: the share of FlashMoBA's bf16 centroids
(``flash_topk_mean_pool``) equal to the fp32 block mean rounded to nearest even, the median relative error of each
against the fp32 mean, and the share of (batch, query, head) rows whose block sets differ between FlashMoBA's fused
top-k and (a) mobalab's router scoring FlashMoBA's own centroids, (b) mobalab with ``centroid_precision="input"``,
(c) mobalab with the default fp32 centroids. If (a) is small against (b) and (c), the difference lies in the
centroids FlashMoBA computes, not in how it ranks them.
"""

from __future__ import annotations

import argparse

import torch

from mobalab.bench import _flash_moba_peer as FM
from mobalab.kernels._cuda_routing import moba_topk_cuda

BATCH, HEADS, DIM, TOP_K = 2, 16, 128, 8


def rows_differ(a: torch.Tensor, b: torch.Tensor) -> float:
    return FM.block_sets_differ(a, b).float().mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq-len", type=int, default=65536)
    ap.add_argument("--block-size", type=int, default=128)
    args = ap.parse_args()
    n, block = args.seq_len, args.block_size
    if n % block:
        ap.error("--seq-len must be a multiple of --block-size")
    mod, why = FM.load()
    if mod is None:
        raise SystemExit(f"FlashMoBA is not importable ({why}); build it with scripts/build_flash_moba.sh")
    from flash_moba.triton_mean_pool import flash_topk_mean_pool

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k = (torch.randn(BATCH, n, HEADS, DIM, device="cuda", generator=g).to(torch.bfloat16) for _ in range(2))
    packed, cu = FM.pack(k)
    theirs = flash_topk_mean_pool(packed, cu, n, block)[0].view(BATCH, n // block, HEADS, DIM)
    mean = k.float().view(BATCH, n // block, block, HEADS, DIM).mean(2)
    rounded = mean.to(k.dtype)

    def median_rel_err(c):
        return ((c.float() - mean).abs() / mean.abs().clamp(min=1e-30)).median().item()

    print(f"N {n}, B {block}: FlashMoBA's centroids equal to the rounded fp32 mean: "
          f"{(theirs == rounded).float().mean().item():.4f}")
    print(f"median relative error against the fp32 mean: FlashMoBA {median_rel_err(theirs):.3g}, "
          f"rounding {median_rel_err(rounded):.3g}")
    sel = FM.selection(q, k, block, TOP_K, True)
    own = moba_topk_cuda(q, k, block, TOP_K, centroids=theirs.float().contiguous())
    print(f"rows whose block sets differ from FlashMoBA's: mobalab on FlashMoBA's centroids {rows_differ(sel, own):.4f}"
          f", mobalab input {rows_differ(sel, moba_topk_cuda(q, k, block, TOP_K, centroid_precision='input')):.4f}"
          f", mobalab fp32 {rows_differ(sel, moba_topk_cuda(q, k, block, TOP_K)):.4f}")


if __name__ == "__main__":
    main()
