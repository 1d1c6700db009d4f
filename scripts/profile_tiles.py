"""One MoBA forward + backward inside an NVTX range "profile", for Nsight Compute.

    ncu --clock-control none --nvtx --nvtx-include "profile/" ... python3 scripts/profile_tiles.py

Warm-up calls (module compilation, autotuned choices) run outside the range, so ncu profiles exactly the
kernels of one step. Inputs are random (never zeros); the configuration is the benchmark's main one.
"""

from __future__ import annotations

import argparse

import torch

from mobalab.kernels import moba_attention


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=65536)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--forward-only", action="store_true")
    a = p.parse_args(argv)
    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (a.batch, a.seq_len, a.heads, a.head_dim)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
               for _ in range(3))
    dout = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=g)

    def step():
        out = moba_attention(q, k, v, a.block_size, a.top_k, causal=True)
        if not a.forward_only:
            # on the calling thread: NVTX ranges are per thread, and autograd runs CUDA backward on a worker
            with torch.autograd.set_multithreading_enabled(False):
                out.backward(dout)

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_push("profile")
    step()
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_pop()


if __name__ == "__main__":
    main()
