"""The split decode path in three launches against its one-launch kernel, and the one-launch kernel's knobs.

    python scripts/decode_pipelined_sweep.py [--out DIR] [--reps N] [--points 512K,128K-B64k4,...]

On the GPU, per point (32 / 8 heads, d 128, bf16, q_len 1, random Gaussian cache): the step of the ``split``
kernel (score, select and attention launches) and of the ``pipelined`` kernel with its default plan, with half
and twice its rounds' lags, with the lags of plain phases (every score, then every selection, then attention),
and with twice the attention CTAs per (sequence, kv head). Timing as ``mobalab.bench.decode`` (CUDA graph,
L2 flushed before every replay, CUDA events, median); bytes needed counted from the selection, and the
fraction of the measured copy bandwidth. Every variant's selection must equal the split path's, its output
agree within 1e-2 (bf16 rounding of different partial splits). Writes ``pipelined_sweep.csv`` and
``pipelined_sweep_table.md`` and prints the table last.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import pandas as pd
import torch

K = 1024
POINTS = {  # name: (N, batch, B, k)
    "512K": (512 * K, 8, 128, 8), "1M": (1024 * K, 8, 128, 8), "128K": (128 * K, 8, 128, 8),
    "128K-B64k4": (128 * K, 8, 64, 4), "128K-B32k8": (128 * K, 8, 32, 8), "128K-k16": (128 * K, 8, 128, 16),
    "32K": (32 * K, 8, 128, 8), "32K-b64": (32 * K, 64, 128, 8),
}


def _variants(cpg: int, lags: tuple[int, int], heads: int):
    """(label, split_launches options): the three launches, then the one-launch kernel's plan and its knobs."""
    ls, la = lags
    yield "split", dict(pipelined=False)
    yield f"pipelined lags {ls}/{la}", dict(pipelined=True)
    half = (max(1, ls // 2), max(2, la // 2))
    yield f"pipelined lags {half[0]}/{half[1]}", dict(pipelined=True, lags=half)
    yield f"pipelined lags {2 * ls}/{2 * la}", dict(pipelined=True, lags=(2 * ls, 2 * la))
    yield f"pipelined phases {heads}/{2 * heads}", dict(pipelined=True, lags=(heads, 2 * heads))
    yield "pipelined cpg x2", dict(pipelined=True, attn_ctas=2 * cpg)


def main(argv=None) -> int:
    from mobalab.bench.decode import copy_bandwidth, selection_bytes, time_step
    from mobalab.kernels import MobaKVCache
    from mobalab.kernels import _cuda_decode_split as S
    from mobalab.kernels._cuda_decode import _sm_count, run

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="results/decode_pipelined")
    p.add_argument("--reps", type=int, default=100)
    p.add_argument("--points", default=",".join(POINTS))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("decode_pipelined_sweep: needs a CUDA GPU", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    flush = torch.zeros(64 << 20, dtype=torch.float32, device="cuda")
    copy = copy_bandwidth()
    dev = torch.cuda.current_device()
    sms = _sm_count(dev)
    rows = []
    for name in args.points.split(","):
        n, batch, block, top_k = POINTS[name]
        heads, kvh, d = 32, 8, 128
        gen = torch.Generator(device="cuda").manual_seed(n + batch + block)
        cache = MobaKVCache(batch, kvh, d, block, n, dtype=torch.bfloat16, device="cuda")
        kv = torch.randn((batch, n, kvh, d), generator=gen, device="cuda", dtype=torch.bfloat16)
        cache.prefill(kv, torch.randn_like(kv))
        del kv
        q = torch.randn((batch, 1, heads, d), generator=gen, device="cuda", dtype=torch.bfloat16)
        scale = 1.0 / math.sqrt(d)
        ref = None
        one = S.plan_split(batch, 1, heads, kvh, d, block, top_k, n, cache.n_blocks, cache.capacity, sm_count=sms,
                           pipelined=True)
        for label, opts in _variants(one.cpg, (one.lag_sel, one.lag_attn), batch * kvh):
            plan, bufs, launches = S.split_launches(q, cache, top_k, scale, sm_count=sms, **opts)

            def step(launches=launches):
                for x in launches:
                    run(x, dev)

            try:
                ms, how = time_step(step, args.reps, flush)
            except Exception as exc:  # a variant that fails is reported, the sweep goes on
                print(f"{name} {label}: failed ({type(exc).__name__}: {str(exc)[:200]})", flush=True)
                continue
            step()
            torch.cuda.synchronize()
            out, sel = bufs["out"].float().clone(), bufs["sel"].clone()
            if ref is None:
                ref = (out, sel)
            same_sel = bool(torch.equal(sel, ref[1]))
            err = float((out - ref[0]).abs().max())
            need = selection_bytes(sel, n, block, kvh, d)["bytes_needed"]
            row = dict(point=name, seq_len=n, batch=batch, block=block, top_k=top_k, variant=label, ms=ms,
                       timing=how, ctas=sum(x.grid[0] for x in launches), cpg=plan.cpg, n_range=plan.n_range,
                       select_wpr=plan.select_wpr, mb_needed=need / 1e6, tbps=need / (ms * 1e-3) / 1e12,
                       roofline=need / (ms * 1e-3) / 1e12 / copy, same_selection=same_sel, max_abs_diff=err,
                       counters_zero=int(cache._counters.abs().sum()) == 0)
            rows.append(row)
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        del cache
        torch.cuda.empty_cache()
    df = pd.DataFrame(rows)
    df.to_csv(os.path.join(args.out, "pipelined_sweep.csv"), index=False)
    print(f"\ncopy bandwidth {copy:.2f} TB/s; {torch.cuda.get_device_name()}")
    cols = ["point", "variant", "ms", "ctas", "cpg", "mb_needed", "roofline", "same_selection", "max_abs_diff",
            "counters_zero"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in df[cols].itertuples(index=False):
        lines.append("| " + " | ".join(f"{x:.4g}" if isinstance(x, float) else str(x) for x in r) + " |")
    with open(os.path.join(args.out, "pipelined_sweep_table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    bad = df[~df.same_selection | (df.max_abs_diff > 1e-2) | ~df.counters_zero]
    return 1 if len(bad) else 0


if __name__ == "__main__":
    sys.exit(main())
