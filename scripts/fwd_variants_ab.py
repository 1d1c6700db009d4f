"""Side-by-side timing of forward tile kernels and build options: ``python scripts/fwd_variants_ab.py [--points ...]``.

Each point (N, block size; batch 2, 16 query heads over ``--kv-heads`` (16) key/value heads, d 128, k ``--top-k`` (8),
causal, bf16, random Gaussian q, k, v)
routes once (:func:`mobalab.kernels._cuda_routing.moba_topk_cuda`), then runs the attention forward on that routing
(:func:`mobalab.kernels._cuda_attention.moba_attention_cuda` with ``topk_indices``: index building, tiles, merge)
once per ``--variants`` entry. A variant is "base" (the default build and tile kernel), a tile kernel of
``moba_attention_cuda``'s ``variant`` ("resident", "wgmma", ...), or build options of cuda/attention.cu joined by
``+`` after either (``base+MOBA_FWD_MINB_SMALL_KT=0+MOBA_FWD_ROLLED_GATHER=0``; a leading option implies "base"):
every launch of the variant's tile-kernel source (cuda/attention_wgmma.cu for the wgmma kernels) compiled with
those defines, its own module. A ``budget=MIB`` part (``wgmma+budget=2048``) gives the call that scratch budget in
MiB (``scratch_budget_bytes``: fewer, larger chunks) instead of the default. Every variant is warmed up, then timed
in alternating order over ``--rounds`` rounds (the first two dropped), each call timed by CUDA events from an idle
GPU. Printed per point: each variant's median in ms, its speedup against the first variant, and the largest output
difference from the first variant.
"""

from __future__ import annotations

import argparse
import sys

import torch

from mobalab.bench._interleaved import extra_defines, is_build_define, print_point_rows, time_arms
from mobalab.kernels import _cuda_attention as CA
from mobalab.kernels._cuda_attention import moba_attention_cuda
from mobalab.kernels._cuda_routing import moba_topk_cuda

K = 1024
POINTS = {"8K": (8 * K, 128), "16K": (16 * K, 128), "64K": (64 * K, 128), "64K-B32": (64 * K, 32),
          "64K-B64": (64 * K, 64), "16K-B32": (16 * K, 32), "16K-B64": (16 * K, 64), "8K-B64": (8 * K, 64)}


def parse_variant(text: str) -> tuple[str | None, tuple[str, ...], int | None]:
    """``"base"`` -> (None, (), None); ``"wgmma+MOBA_X=2"`` -> ("wgmma", ("MOBA_X=2",), None);
    ``"MOBA_X=2+budget=1024"`` -> (None, ("MOBA_X=2",), 1 << 30): the tile kernel (None: the default), build
    options and the scratch budget in bytes (None: the default)."""
    head, *rest = text.split("+")
    if head.startswith(("MOBA_", "budget=")):
        head, rest = "base", [head, *rest]
    if head != "base" and head not in CA.VARIANTS:
        raise argparse.ArgumentTypeError(f"variant {text!r}: {head!r} is not base or one of {', '.join(CA.VARIANTS)}")
    budget = None
    defines = []
    for d in rest:
        if d.startswith("budget="):
            mib = d.removeprefix("budget=")
            if not mib.isdigit() or int(mib) < 1:
                raise argparse.ArgumentTypeError(f"variant {text!r}: {d!r} is not budget=MIB (a positive integer)")
            budget = int(mib) << 20
        elif is_build_define(d):
            defines.append(d)
        else:
            raise argparse.ArgumentTypeError(f"variant {text!r}: {d!r} is neither MOBA_NAME=INTEGER nor budget=MIB")
    return (None if head == "base" else head), tuple(defines), budget


def run_point(seqlen: int, block: int, variants: list[str], rounds: int, seed: int = 0, top_k: int = 8,
              kv_heads: int = 16) -> list[dict]:
    """One point's rows: variant, median ms, speedup against the first variant, largest output difference."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(2, seqlen, 16, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(2, seqlen, kv_heads, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    topk = moba_topk_cuda(q, k, block, top_k, causal=True).to(torch.int32).contiguous()

    def call(variant):
        kernel, defines, budget = parse_variant(variant)
        with extra_defines(CA, CA.fwd_source(128, block, kernel), defines):
            return moba_attention_cuda(q, k, v, block, top_k, True, topk_indices=topk, variant=kernel,
                                       scratch_budget_bytes=budget)

    outs, ms = time_arms(call, variants, rounds)
    first = variants[0]
    return [dict(variant=name, ms=ms[name], speedup=ms[first] / ms[name],
                 max_diff=(outs[name].float() - outs[first].float()).abs().max().item()) for name in variants]


def _variant_arg(text: str) -> str:
    parse_variant(text)
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--points", nargs="+", default=["8K", "64K", "64K-B32"], choices=sorted(POINTS))
    p.add_argument("--variants", nargs="+", default=["base"], type=_variant_arg,
                   help='"base" or a tile kernel, then MOBA_NAME=INTEGER build options of cuda/attention.cu, joined '
                        'by "+"')
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--top-k", type=int, default=8, help="blocks per query (the forward's top_k: 1..64)")
    p.add_argument("--kv-heads", type=int, default=16, help="key/value heads (a divisor of the 16 query heads: GQA)")
    a = p.parse_args(argv)
    if a.rounds < 3:
        p.error(f"--rounds must be at least 3 (the first two are dropped), got {a.rounds}")
    if not 1 <= a.top_k <= 64:
        p.error(f"--top-k must be in 1..64 (the forward's top_k), got {a.top_k}")
    if a.kv_heads < 1 or 16 % a.kv_heads:
        p.error(f"--kv-heads must divide the 16 query heads (1, 2, 4, 8 or 16), got {a.kv_heads}")

    def point(name):
        return run_point(*POINTS[name], a.variants, a.rounds, top_k=a.top_k, kv_heads=a.kv_heads)

    return print_point_rows(
        "fwd_variants_ab", a.points, point,
        "| point | variant | ms | speedup | max out diff |\n|---|---|---|---|---|",
        lambda name, r: f"| {name} | {r['variant']} | {r['ms']:.3f} | {r['speedup']:.3f} | {r['max_diff']:.1e} |")


if __name__ == "__main__":
    sys.exit(main())
