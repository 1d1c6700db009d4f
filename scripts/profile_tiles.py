"""One MoBA forward + backward inside an NVTX range "profile", for Nsight Compute.

    ncu --clock-control none --nvtx --nvtx-include "profile/" ... python3 scripts/profile_tiles.py [--impl IMPL]

Warm-up calls (module compilation, autotuned choices) run outside the range, so ncu profiles exactly the
kernels of one step. Inputs are random (never zeros); the configuration is the benchmark's main one. The
gradients come from ``torch.autograd.grad`` (as in the benchmark), so no gradient-accumulation kernels enter the
profile. ``--impl flash-moba`` profiles the same step of FlashMoBA (the MoBA paper's kernels, an optional peer
built by ``scripts/build_flash_moba.sh``; bf16, d 128, causal, no GQA) on the same inputs, packed as its
variable-length API takes them. ``--build-option SOURCE.cu:MOBA_NAME=VALUE`` (repeatable) builds mobalab's kernels of
that source with a build option that is not the default (the benchmark's option of that name).
"""

from __future__ import annotations

import argparse
import sys

import torch

from mobalab.bench._interleaved import build_option_arg, build_options
from mobalab.kernels import moba_attention


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=65536)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--forward-only", action="store_true")
    p.add_argument("--impl", choices=("mobalab", "flash-moba"), default="mobalab")
    p.add_argument("--build-option", action="append", default=[], type=build_option_arg,
                   metavar="SOURCE.cu:MOBA_NAME=VALUE")
    a = p.parse_args(argv)
    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (a.batch, a.seq_len, a.heads, a.head_dim)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
               for _ in range(3))
    dout = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=g)

    if a.impl == "mobalab":
        leaves, grad_out = (q, k, v), dout

        def forward():
            return moba_attention(q, k, v, a.block_size, a.top_k, causal=True)
    else:
        from mobalab.bench import _flash_moba_peer as fm

        reason = fm.unavailable(q.dtype, a.head_dim, True, a.top_k, a.heads, a.heads)
        if reason:
            print(f"profile_tiles: FlashMoBA cannot run this step: {reason}", file=sys.stderr)
            return 2
        leaves, forward, grad_out = fm.packed_step(q, k, v, dout, a.block_size, a.top_k)

    def step():
        if a.forward_only:
            with torch.no_grad():
                forward()
            return
        # on the calling thread: NVTX ranges are per thread, and autograd runs CUDA backward on a worker
        with torch.autograd.set_multithreading_enabled(False):
            torch.autograd.grad(forward(), leaves, grad_out)

    with build_options(a.build_option):
        for _ in range(2):
            step()
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_push("profile")
        step()
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_pop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
