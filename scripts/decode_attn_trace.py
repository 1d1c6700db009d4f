"""Where the split decode step spends its time, per CTA: ``python scripts/decode_attn_trace.py
[--points 512K,128K-B64k4] [--variants plan probe=2] [--dump DIR]``.

The attention launch is built with DSP_ATTN_TRACE=1 (cuda/decode_split.cu): thread 0 of every CTA notes
%globaltimer at its start, first item, loop end and end, and the clock64 cycles of each phase of its item loop
(and, in the selecting kernel, of its selection before the first item).
The routing launches are built with DSP_ROUTE_TRACE=1: thread 0 of every score CTA notes its start, when its
length arrived, when its first batch was scored and its end; of every select CTA its start and end.
Each point (``decode_split_ab.py``'s points and variant knobs) runs a few steps, then one step with L2 flushed
whose traces are read. Printed per variant: the step's timeline (every launch's CTA starts and ends, min / median /
max, us after the first score CTA's start), then for the attention launch its span, when CTAs start, reach their
first item, end their loops and end (us after its first CTA's start), items per CTA, and the mean cycles per item
of each loop phase (per CTA; thread 0's view, so a barrier's wait is charged to the phase it ends). ``--dump``
saves every point's and variant's raw traces (``torch.save``) for a closer look.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys

import torch

PHASES = ("setup", "issue", "gather", "wait", "q rows", "math", "combine", "merge")
SELECT_PHASES = ("query rows", "grid wait", "row selection", "entries and set")
ROW_PHASES = ("level 1 loads", "level 1 ranking", "level 2 loads", "level 2 ranking")


def summarise(tr, label: str) -> list[str]:
    """Lines describing trace rows ``tr`` (int64 tensor (ctas, 24), the kernel's slot layout)."""
    t0 = tr[:, 8].min()
    rel = (tr[:, 8:12] - t0).double() / 1e3  # us
    items = tr[:, 12].double()
    last = tr[:, 15] == 1

    def q3(x):
        x = x.sort().values
        return f"{x[0]:.1f} / {x[len(x) // 2]:.1f} / {x[-1]:.1f}"

    span = (tr[:, 11].max() - t0).item() / 1e3
    loop_us = rel[:, 2] - rel[:, 1]
    lines = [f"  {label}: span {span:.1f} us; {len(tr)} CTAs on {tr[:, 14].unique().numel()} SMs; "
             f"items per CTA {q3(items)}; gathers per CTA {tr[:, 13].double().mean():.1f}",
             f"    start {q3(rel[:, 0])} | first item {q3(rel[:, 1])} | loop end {q3(rel[:, 2])} | "
             f"end {q3(rel[:, 3])} (us, min / median / max)",
             f"    loop us per item {q3(loop_us / items.clamp(min=1))}; merge CTAs' merge "
             f"{(rel[last, 3] - rel[last, 2]).mean():.1f} us"]
    per_item = tr[:, 1:7].double().sum(0) / items.sum()
    cyc = ", ".join(f"{PHASES[i + 1]} {per_item[i]:.0f}" for i in range(6))
    setup = tr[:, 0].double().mean()
    merge = tr[last, 7].double().mean() if last.any() else float("nan")
    lines.append(f"    cycles per item: {cyc}; per CTA: setup {setup:.0f}, merge (last CTAs) {merge:.0f}")
    if tr[:, 16:20].any():  # the selecting kernel: its selection's phases, before setup's rest
        sel = tr[:, 16:20].double().mean(0)
        lines.append("    selection cycles per CTA (mean, before setup): " +
                     ", ".join(f"{n} {c:.0f}" for n, c in zip(SELECT_PHASES, sel.tolist(), strict=True)))
        row = tr[:, 20:24].double().mean(0)  # thread 0's row selection, split
        lines.append("    row selection cycles (thread 0, mean): " +
                     ", ".join(f"{n} {c:.0f}" for n, c in zip(ROW_PHASES, row.tolist(), strict=True)))
    # how the loop ends spread over SMs: the SMs whose CTAs end last
    sm = tr[:, 14]
    sm_end = torch.zeros(int(sm.max()) + 1, dtype=torch.float64).scatter_reduce(0, sm, rel[:, 2], "amax")
    sm_items = torch.zeros_like(sm_end).scatter_add(0, sm, items)
    used = sm_items > 0
    lines.append(f"    per SM: items {q3(sm_items[used])}, loop end {q3(sm_end[used])} us")
    return lines


def timeline(score, select, attend) -> list[str]:
    """Lines of the step's timeline from the launches' traces (int64 tensors: score (ctas, 8: start, length,
    first batch, end, SM), select (ctas, 2: start, end), attend (ctas, 24); score or select None where the step has
    no such launch), us after the first CTA's start."""
    first = score if score is not None else select  # the step's first launch
    t0 = (first[:, 0] if first is not None else attend[:, 8]).min()

    def q3(x):
        x = ((x - t0).double() / 1e3).sort().values
        return f"{x[0]:.1f} / {x[len(x) // 2]:.1f} / {x[-1]:.1f}"

    lines = []
    if score is not None:
        lines.append(f"    score ({len(score)} CTAs): start {q3(score[:, 0])} | length {q3(score[:, 1])} | first batch "
                     f"{q3(score[:, 2])} | end {q3(score[:, 3])}")
    if select is not None:
        lines.append(f"    select ({len(select)} CTAs): start {q3(select[:, 0])} | end {q3(select[:, 1])}")
    lines.append(f"    attend ({len(attend)} CTAs): start {q3(attend[:, 8])} | first item {q3(attend[:, 9])} | "
                 f"loop end {q3(attend[:, 10])} | end {q3(attend[:, 11])} (us after the step's first CTA, "
                 f"min / median / max)")
    return lines


def main(argv=None) -> int:
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from decode_split_ab import POINTS, parse_variant, pop_builds, with_builds

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--points", default="512K,128K-B64k4")
    p.add_argument("--variants", nargs="*", default=["probe=2"])
    p.add_argument("--dump", default=None, help="directory for the raw traces (one .pt file per point)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("decode_attn_trace: needs a CUDA GPU", file=sys.stderr)
        return 2
    import cupy

    from mobalab.bench.decode import HEAD_DIM, _flush_l2, l2_flush_buffer, random_cache
    from mobalab.kernels import _cuda_decode_split as S
    from mobalab.kernels._build import _module, sm_count
    from mobalab.kernels._launch import _module_defines, launch

    flush = l2_flush_buffer()
    dev = torch.cuda.current_device()
    variants = {"plan": {}, **{v: parse_variant(v) for v in args.variants}}
    for name in args.points.split(","):
        n, batch, block, top_k = POINTS[name]
        cache, q = random_cache(n, batch, block, n + block)
        print(f"{name} (N {n}, batch {batch}, B {block}, k {top_k}):", flush=True)
        dumped = {}
        for label, opts in variants.items():
            opts = dict(opts)
            builds = pop_builds(opts)
            plan, bufs, launches = S.split_launches(q, cache, top_k, 1 / math.sqrt(HEAD_DIM),
                                                    sm_count=sm_count(dev), **opts)
            launches = with_builds(launches, builds, {"attend": ["DSP_ATTN_TRACE=1"],
                                                       "route_": ["DSP_ROUTE_TRACE=1"]})
            att = launches[-1]
            for _ in range(5):
                for x in launches:
                    launch(x)
            _flush_l2(flush)
            for x in launches:
                launch(x)
            torch.cuda.synchronize()
            mod = _module(att.source, _module_defines(att.kernel, att.defines), ())
            ctas = int(att.grid[0])
            buf = cupy.ndarray((4096, 24), cupy.uint64, mod.get_global("dsp_trace"))
            tr = torch.as_tensor(buf[:ctas].astype(cupy.int64).get())
            route = {}
            for x in launches[:-1]:
                which = "score" if "score" in x.kernel else "select"
                rmod = _module(x.source, _module_defines(x.kernel, x.defines), ())
                rbuf = cupy.ndarray((8192, 8 if which == "score" else 2), cupy.uint64,
                                    rmod.get_global(f"dsp_{which}_trace"))
                route[which] = torch.as_tensor(rbuf[:int(x.grid[0])].astype(cupy.int64).get())
            lines = summarise(tr, f"{label} (ranges {plan.range_blocks}x{plan.n_range}, {plan.cpg} CTAs per kv "
                                  f"head)")
            lines[1:1] = timeline(route.get("score"), route.get("select"), tr)
            for line in lines:
                print(line, flush=True)
            dumped[label] = dict(route, attend=tr, plan=dataclasses.asdict(plan))
        if args.dump:
            os.makedirs(args.dump, exist_ok=True)
            torch.save(dumped, os.path.join(args.dump, f"trace_{name}.pt"))
        del cache
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
