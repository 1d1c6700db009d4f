"""Where the host's time goes in one MoBA forward + backward step, and where the GPU waits for it.

    python3 scripts/profile_host.py [--seq-len 16384 8192] [--steps 30] [--out DIR]

Timed "from an idle GPU" (the benchmark's first columns), a step costs its GPU time plus every stretch in which
the GPU has finished what the host issued and waits for the next launch. Per length this prints

* the step's host time (wall clock from the call to the return of ``backward``, no synchronisation inside) and
  its time from an idle GPU (CUDA events, synchronised before and after), medians over ``--steps``;
* the GPU's idle gaps inside one step (torch profiler, kernels and copies on the device timeline): each gap of
  more than 5 us with the kernel before and after it, and their sum;
* the host functions by own time (cProfile over ``--steps`` steps, top 30), written to ``host_<N>.txt``, and by
  cumulative time (top 80) to ``host_<N>_cumulative.txt``.

Inputs are random bf16 (batch 2, 16 heads, d 128, B 128, k 8, causal: the benchmark's configuration).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pathlib
import pstats
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from mobalab.kernels import moba_attention


def _step_fn(n: int, batch: int, heads: int, dim: int, block: int, top_k: int):
    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (batch, n, heads, dim)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
               for _ in range(3))
    dout = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=g)

    def step():
        out = moba_attention(q, k, v, block, top_k, causal=True)
        return torch.autograd.grad(out, (q, k, v), dout)

    return step


def _gaps(prof, min_us: float = 5.0):
    """GPU idle gaps (us) between consecutive device events of one step: [(gap, before, after)]."""
    events = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                     and e.time_range.elapsed_us() > 0), key=lambda e: e.time_range.start)
    out, end, name = [], None, None
    for e in events:
        if end is not None and e.time_range.start - end > min_us:
            out.append((e.time_range.start - end, name, e.name))
        if end is None or e.time_range.end > end:
            end, name = e.time_range.end, e.name
    span = (end - events[0].time_range.start) if events else 0.0
    return out, span


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, nargs="+", default=[16384, 8192])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("host_profile"))
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_host: needs a CUDA GPU", file=sys.stderr)
        return 2
    a.out.mkdir(parents=True, exist_ok=True)
    for n in a.seq_len:
        step = _step_fn(n, 2, 16, 128, 128, 8)
        for _ in range(5):
            step()
        host, idle = [], []
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(a.steps):
            torch.cuda.synchronize()
            e0.record()
            t0 = time.perf_counter()
            step()
            host.append((time.perf_counter() - t0) * 1e3)
            e1.record()
            torch.cuda.synchronize()
            idle.append(e0.elapsed_time(e1))
        with profile(activities=[ProfilerActivity.CUDA]) as prof:  # CUDA only: less host cost added
            step()
            torch.cuda.synchronize()
        gaps, span = _gaps(prof)
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(a.steps):
            step()
            torch.cuda.synchronize()
        pr.disable()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(30)
        (a.out / f"host_{n}.txt").write_text(s.getvalue())
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(80)
        (a.out / f"host_{n}_cumulative.txt").write_text(s.getvalue())
        print(f"N {n}: host {statistics.median(host):.3f} ms per step, from an idle GPU "
              f"{statistics.median(idle):.3f} ms; profiled step: device span {span / 1e3:.3f} ms, "
              f"{len(gaps)} gaps > 5 us summing to {sum(g for g, _, _ in gaps) / 1e3:.3f} ms")
        for gap, before, after in gaps:
            print(f"  {gap:8.1f} us  after {before[:60]:60s} before {after[:60]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
