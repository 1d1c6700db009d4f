"""Side-by-side timing of split decode plans: ``python scripts/decode_split_ab.py [--points ...] [--variants ...]``.

Each point (N, batch, B, k; 32 / 8 heads, d 128, bf16, q_len 1, random Gaussian cache) runs the split path's
step with the plan's own choices and with each variant's overrides of ``split_launches`` (``range_blocks``,
``attn_ctas``, ``select_wpr``, ``fused_select=0`` for the three launches, ``dependent=0`` for an ordinary attention
launch after the score pass), e.g. ``--variants range_blocks=128 attn_ctas=8 select_wpr=4``, or over a paged copy
of the cache (``page_size=P``: the same tokens in pages of P tokens, shuffled over the pool; the attend_paged
kernel), or with a timing probe of the attention launch (``probe=N``: cuda/decode_split.cu's build option
DSP_ATTN_PROBE; 1 no math, 2 no copies, 3 no merge; wrong outputs, timing only), or with ``whole_copy=0`` (the
build option DSP_ATTN_WHOLE_COPY: every row of an item's copies tested, as before the whole-item path), or with
``l2_prefetch=0|64|128|256`` (DSP_ATTN_L2_PREFETCH: the K / V copies' L2 prefetch size hint) or
``score_l2_prefetch=...`` (DSP_SCORE_L2_PREFETCH: the same for the score pass's block-sum loads) or ``tma=0|1``
(DSP_ATTN_TMA: K and V by tensor-map bulk copies on mbarriers instead of 16-byte cp.async). Every variant is
warmed up first, then the variants are timed in alternating order over ``--repeats`` rounds (the first timing in
a process runs slow while the clocks ramp up), each round the median of ``--reps`` CUDA-graph replays with L2
flushed before every replay (``mobalab.bench.decode.time_step``). Printed per point: each variant's middle two
of the sorted round times in us, whether its selection equals the plan's, and how far its output is from the
plan's (where it is not equal).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys

import torch

from mobalab.bench.decode import HEAD_DIM, K

POINTS = {
    "512K": (512 * K, 8, 128, 8), "1M": (1024 * K, 8, 128, 8), "128K": (128 * K, 8, 128, 8),
    "128K-B64k4": (128 * K, 8, 64, 4), "128K-B32k8": (128 * K, 8, 32, 8), "128K-k16": (128 * K, 8, 128, 16),
    "32K": (32 * K, 8, 128, 8), "32K-b64": (32 * K, 64, 128, 8), "128K-b1": (128 * K, 1, 128, 8),
}
# build-option knobs: knob -> (the kernel-name part of the launches it builds, cuda/decode_split.cu's define)
BUILD_KNOBS = {"probe": ("attend", "DSP_ATTN_PROBE"), "whole_copy": ("attend", "DSP_ATTN_WHOLE_COPY"),
               "l2_prefetch": ("attend", "DSP_ATTN_L2_PREFETCH"), "tma": ("attend", "DSP_ATTN_TMA"),
               "score_l2_prefetch": ("route_score", "DSP_SCORE_L2_PREFETCH"),
               "own_wait": ("moba_decode", "DSP_OWN_WAIT")}  # both launches: the score CTAs release, attention waits
KNOBS = ("range_blocks", "attn_ctas", "select_wpr", "fused_select", "dependent", "attn_chunk", "attn_stages",
         "page_size", *BUILD_KNOBS)


def parse_variant(text: str) -> dict:
    """``"attn_ctas=8,select_wpr=4"`` -> {"attn_ctas": 8, "select_wpr": 4}; ``"plan"`` -> {}."""
    if text == "plan":
        return {}
    out = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        if key not in KNOBS or not value.isdigit():
            raise ValueError(f"variant {text!r}: want KNOB=INT[,KNOB=INT], knobs {', '.join(KNOBS)}")
        out[key] = int(value)
    return out


def pop_builds(opts: dict) -> dict:
    """The build-option knobs of variant ``opts`` (:data:`BUILD_KNOBS`), taken out of it."""
    return {knob: opts.pop(knob) for knob in list(opts) if knob in BUILD_KNOBS}


def with_builds(launches: list, builds: dict, extra: dict | None = None) -> list:
    """``launches`` with the defines of ``builds`` (:func:`pop_builds`) and ``extra`` (kernel-name part -> defines)
    added to the launches they build (a launch with defines compiles its own module: ``_launch.launch``)."""
    out = []
    for x in launches:
        defines = [f"{define}={builds[knob]}" for knob, (part, define) in BUILD_KNOBS.items()
                   if knob in builds and part in x.kernel]
        defines += [d for part, ds in (extra or {}).items() if part in x.kernel for d in ds]
        out.append(dataclasses.replace(x, defines=(*x.defines, *defines)) if defines else x)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--points", default="512K,128K-B64k4,128K,32K", help=f"comma-separated, of {', '.join(POINTS)}")
    p.add_argument("--variants", nargs="*", default=["attn_ctas=8", "select_wpr=4"])
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--reps", type=int, default=80)
    args = p.parse_args(argv)
    variants = {"plan": {}, **{v: parse_variant(v) for v in args.variants}}
    points = args.points.split(",")
    unknown = [x for x in points if x not in POINTS]
    if unknown:
        p.error(f"unknown points {unknown}; known: {', '.join(POINTS)}")
    if not torch.cuda.is_available():
        print("decode_split_ab: needs a CUDA GPU", file=sys.stderr)
        return 2

    from mobalab.bench._interleaved import interleaved_times
    from mobalab.bench.decode import l2_flush_buffer, random_cache, time_step
    from mobalab.kernels import _cuda_decode_split as S
    from mobalab.kernels._build import sm_count
    from mobalab.kernels._cuda_decode import run as run_plain
    from mobalab.kernels._launch import launch

    def run(x, dev):  # a launch with build options compiles its own module (_launch.launch)
        if x.defines:
            launch(x)
        else:
            run_plain(x, dev)

    flush = l2_flush_buffer()
    dev = torch.cuda.current_device()
    for name in points:
        n, batch, block, top_k = POINTS[name]
        cache, q = random_cache(n, batch, block, n + block)
        caches = {None: cache}
        built = {}
        for label, opts in variants.items():
            opts = dict(opts)
            page = opts.pop("page_size", None)
            builds = pop_builds(opts)
            if page not in caches:
                caches[page] = paged_copy(cache, page)
            plan, bufs, launches = S.split_launches(q, caches[page], top_k, 1 / math.sqrt(HEAD_DIM),
                                                    sm_count=sm_count(dev), **opts)
            launches = with_builds(launches, builds)
            for _ in range(3):
                for x in launches:
                    run(x, dev)
            torch.cuda.synchronize()
            built[label] = (plan, launches, bufs["sel"].clone(), bufs["out"].float().clone())
        def step_us(launches):
            return time_step(lambda: [run(x, dev) for x in launches], args.reps, flush)[0] * 1e3

        times = interleaved_times({label: built[label][1] for label in variants}, args.repeats, step_us)
        cells = []
        for label, (plan, _, sel, out) in built.items():
            t = sorted(times[label])
            mid = t[len(t) // 2 - 1:len(t) // 2 + 1] if len(t) > 1 else t
            same = torch.equal(sel, built["plan"][2])
            diff = (out - built["plan"][3]).abs().max().item()
            cells.append(f"{label} (ranges {plan.range_blocks}x{plan.n_range}, {plan.cpg} CTAs, {plan.select_wpr} "
                         f"warps): {'-'.join(f'{x:.1f}' for x in mid)} us{'' if same else ' SELECTION DIFFERS'}"
                         f"{f', out differs by {diff:.1e}' if diff else ''}")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
        del cache, caches, built
        torch.cuda.empty_cache()
    return 0


def paged_copy(cache, page_size: int):
    """A paged cache of ``page_size`` tokens per page holding ``cache``'s tokens, its pages shuffled over the pool
    (so that no sequence's pages lie in order)."""
    from mobalab.kernels import MobaKVCache

    n = int(cache.lengths.max())
    paged = MobaKVCache(cache.batch, cache.kv_heads, cache.head_dim, cache.block_size, cache.max_seqlen,
                        dtype=cache.dtype, device=cache.device, page_size=page_size)
    paged.prefill(cache.k[:, :, :n].transpose(1, 2), cache.v[:, :, :n].transpose(1, 2), lengths=cache.lengths)
    paged._move_pages(torch.randperm(paged.num_pages, generator=torch.Generator().manual_seed(page_size)))
    return paged


if __name__ == "__main__":
    sys.exit(main())
