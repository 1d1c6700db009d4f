"""Side-by-side timing of the backward's main-kernel variants: ``python scripts/bwd_variants_ab.py [--points ...]``.

Each point (N, head dim; batch 2 (1 at 512K), 16 heads, B 128, k 8, causal, bf16, random Gaussian q, k, v, dO) runs
:func:`mobalab.kernels._cuda_backward.moba_attention_backward_cuda` with each ``--variants`` entry ("tile", "block",
"wgmma") on the same forward outputs and routing. Every variant is warmed up, then timed in alternating order over
``--rounds`` rounds (the first timing in a process runs slow while the clocks ramp up; the first two rounds are
dropped), each call timed by CUDA events from an idle GPU. Printed per point: each variant's median in ms, its
speedup against the first variant, and the largest gradient difference from the first variant relative to the
largest gradient (the order of float additions differs, so not zero). Useful FLOP rates are the benchmark's
(``python -m mobalab.bench.attention --backward`` with ``MOBALAB_BWD_VARIANT``); this script compares times.

A variant may carry build options of its module (cuda/attention_bwd.cu; "wgmma": attention_bwd_wgmma.cu) after a
``+``: ``block+MOBA_BWD_DQ_UNROLL=2`` runs "block" with every backward launch compiled with ``-DMOBA_BWD_DQ_UNROLL=2``
(its own module), for measuring a kernel change against the default build in one process.
"""

from __future__ import annotations

import argparse
import sys

import torch

from mobalab.bench._interleaved import extra_defines, is_build_define, print_point_rows, time_arms
from mobalab.kernels import _cuda_backward as CB
from mobalab.kernels._cuda_attention import moba_attention_cuda
from mobalab.kernels._cuda_backward import BWD_VARIANTS, moba_attention_backward_cuda
from mobalab.kernels._cuda_routing import moba_topk_cuda

K = 1024
# name -> (N, head dim, batch): batch 2, but one sequence at 512K (as the benchmark's 512K point)
POINTS = {"8K": (8 * K, 128, 2), "16K": (16 * K, 128, 2), "64K": (64 * K, 128, 2), "64K-d64": (64 * K, 64, 2),
          "8K-d64": (8 * K, 64, 2), "512K": (512 * K, 128, 1)}


def parse_variant(text: str) -> tuple[str, tuple[str, ...]]:
    """``"block+MOBA_X=2+MOBA_Y=1"`` -> ("block", ("MOBA_X=2", "MOBA_Y=1")): a backward variant and build options."""
    name, *defines = text.split("+")
    if name not in BWD_VARIANTS:
        raise argparse.ArgumentTypeError(f"variant {text!r}: {name!r} is not one of {', '.join(BWD_VARIANTS)}")
    for d in defines:
        if not is_build_define(d):
            raise argparse.ArgumentTypeError(f"variant {text!r}: build option {d!r} is not MOBA_NAME=INTEGER")
    return name, tuple(defines)


def variant_source(name: str) -> str:
    """The cuda/ source whose launches a variant's build options go to: the wgmma kernels' module for "wgmma"."""
    return CB.WGMMA_SOURCE if name == "wgmma" else CB.SOURCE


def run_point(seqlen: int, dim: int, batch: int, variants: list[str], rounds: int, seed: int = 0) -> list[dict]:
    """One point's rows: variant, median ms, speedup against the first variant, relative gradient difference."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v, dout = (torch.randn(batch, seqlen, 16, dim, device="cuda", dtype=torch.bfloat16, generator=g)
                     for _ in range(4))
    topk = moba_topk_cuda(q, k, 128, 8, causal=True).to(torch.int32).contiguous()
    out, lse = moba_attention_cuda(q, k, v, 128, 8, True, return_lse=True, topk_indices=topk)

    def call(variant):
        name, defines = parse_variant(variant)
        with extra_defines(CB, variant_source(name), defines):
            return moba_attention_backward_cuda(dout, q, k, v, out, lse, topk, 128, 8, True, dim ** -0.5,
                                                variant=name)

    grads, ms = time_arms(call, variants, rounds)
    first = variants[0]
    scale = max(x.float().abs().max().item() for x in grads[first])
    rows = []
    for vname in variants:
        diff = max((x.float() - y.float()).abs().max().item() for x, y in zip(grads[vname], grads[first], strict=True))
        rows.append(dict(variant=vname, ms=ms[vname], speedup=ms[first] / ms[vname], rel_diff=diff / scale))
    return rows


def _variant_arg(text: str) -> str:
    parse_variant(text)
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--points", nargs="+", default=["8K", "16K", "64K", "64K-d64"], choices=sorted(POINTS))
    p.add_argument("--variants", nargs="+", default=["tile", "block"], type=_variant_arg,
                   help=f"of {', '.join(BWD_VARIANTS)}, each optionally +MOBA_NAME=INTEGER build options")
    p.add_argument("--rounds", type=int, default=12)
    a = p.parse_args(argv)
    return print_point_rows(
        "bwd_variants_ab", a.points, lambda name: run_point(*POINTS[name], a.variants, a.rounds),
        "| point | variant | ms | speedup | max grad diff / max grad |\n|---|---|---|---|---|",
        lambda name, r: f"| {name} | {r['variant']} | {r['ms']:.3f} | {r['speedup']:.3f} | {r['rel_diff']:.1e} |")


if __name__ == "__main__":
    sys.exit(main())
