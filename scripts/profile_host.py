"""Where the host's time goes in one MoBA forward + backward step, and where the GPU waits for it.

    python3 scripts/profile_host.py [--seq-len 16384 8192] [--steps 30] [--out DIR] [--launches-only]

Timed "from an idle GPU" (the benchmark's first columns), a step costs its GPU time plus every stretch in which
the GPU has finished what the host issued and waits for the next launch. Per length this prints

* the step's host time (wall clock from the call to the return of ``backward``, no synchronisation inside) and
  its time from an idle GPU (CUDA events, synchronised before and after), medians over ``--steps``;
* the GPU's idle gaps inside one step (torch profiler, kernels and copies on the device timeline): each gap of
  more than 5 us with the kernel before and after it, and their sum;
* where the GPU waits, launch by launch, without a profiler: a CUDA event (created beforehand) recorded after
  every ``mobalab.kernels._launch.launch``, the step timed from an idle GPU and again with the GPU held busy (a sleep
  kernel) until the host has issued the whole step; per launch the time its work was done by in both runs and
  the difference's growth since the previous launch (the GPU's wait for the host before that launch, torch's own
  launches in between included), medians over ``--steps``, written to ``launches_<N>.txt`` and printed;
* the host's path through one step call by call (``--calls``): the functions of :data:`_TRACED` wrapped, each
  call's entry and exit in ms since the step began (medians over ``--steps``), indented by nesting, written to
  ``calls_<N>.txt``: where the time before the first launch, and between launches, goes;
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


def _launch_waits(step, reps: int, ahead_ms: float = 20.0):
    """Per ``mobalab.kernels._launch.launch`` of one step: (kernel, host ms at the launch, GPU ms done
    from an idle GPU, GPU ms done with the host ahead), medians over ``reps``; and the two steps' medians."""
    from mobalab.kernels import _launch

    # one untimed step counts the launches (a 512K step makes ~370), so that the pool fits any length; the count
    # only, since keeping the plans would keep that step's buffers alive
    n_launches = [0]

    def count(plan):
        n_launches[0] += 1

    _launch._after_launch = count
    try:
        step()
    finally:
        _launch._after_launch = None
    rec, pool = [], [torch.cuda.Event(enable_timing=True) for _ in range(n_launches[0])]
    for e in pool:  # created here (at their first record), not inside the timed steps
        e.record()
    torch.cuda.synchronize()

    def traced(plan):
        e = pool[len(rec)]
        e.record()
        rec.append((plan.kernel, e, time.perf_counter()))

    cycles = int(ahead_ms * 2e6)  # ~2 GHz: at least ahead_ms on a Hopper GPU
    runs = {"idle": [], "ahead": []}
    _launch._after_launch = traced
    try:
        for _ in range(reps):
            for mode in ("idle", "ahead"):
                rec.clear()
                torch.cuda.synchronize()
                if mode == "ahead":
                    torch.cuda._sleep(cycles)  # the GPU busy while the host issues the step
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                t0 = time.perf_counter()
                step()
                e1.record()
                torch.cuda.synchronize()
                runs[mode].append(([(name, (t - t0) * 1e3, e0.elapsed_time(e)) for name, e, t in rec],
                                   e0.elapsed_time(e1)))
    finally:
        _launch._after_launch = None
    idle, ahead = runs["idle"], runs["ahead"]
    rows = []
    for i, (name, _, _) in enumerate(idle[0][0]):
        rows.append((name, statistics.median(r[0][i][1] for r in idle), statistics.median(r[0][i][2] for r in idle),
                     statistics.median(r[0][i][2] for r in ahead)))
    return rows, statistics.median(r[1] for r in idle), statistics.median(r[1] for r in ahead)


#: (module, function) pairs that --calls times; each is looked up by attribute at its call sites
_TRACED = [
    ("torch", "empty"), ("torch", "zeros"), ("torch", "empty_like"),
    ("mobalab.kernels._contract", "check_inputs"), ("mobalab.kernels._contract", "check_tensor"),
    ("mobalab.kernels.autograd", "moba_attention_autograd"), ("mobalab.kernels.autograd", "_fwd_impl"),
    ("mobalab.kernels.autograd", "_bwd_impl"), ("mobalab.kernels.autograd", "_folded"),
    ("mobalab.kernels.autograd", "_lists_numel"),
    ("mobalab.kernels._cuda_routing", "topk_cuda_checked"), ("mobalab.kernels._cuda_routing", "topk_into"),
    ("mobalab.kernels._cuda_routing", "resolve_router_variant"), ("mobalab.kernels._cuda_routing", "topk_launch"),
    ("mobalab.kernels._cuda_routing", "centroid_launch"),
    ("mobalab.kernels._cuda_attention", "forward_checked"), ("mobalab.kernels._cuda_attention", "_forward"),
    ("mobalab.kernels._cuda_attention", "build_pair_lists"), ("mobalab.kernels._cuda_attention", "pair_scratch"),
    ("mobalab.kernels._cuda_attention", "plan_chunks"), ("mobalab.kernels._cuda_attention", "fwd_launch"),
    ("mobalab.kernels._cuda_attention", "merge_launch"), ("mobalab.kernels._cuda_backward", "backward_checked"),
    ("mobalab.kernels._cuda_backward", "_backward"),
    ("mobalab.kernels._launch", "launch"), ("mobalab.kernels._launch", "check_args"),
    ("mobalab.kernels._launch", "get_kernel"), ("mobalab.kernels._launch", "_driver_launch"),
    ("mobalab.kernels._launch", "current_stream"),
]


def _call_times(step, reps: int):
    """[(depth, name, entry ms, exit ms)] of one step's calls of :data:`_TRACED`, medians over ``reps``."""
    import importlib

    rec, depth, t0 = [], [0], [0.0]
    saved = []

    def wrap(name, fn):
        def traced(*args, **kwargs):
            i = len(rec)
            rec.append([depth[0], name, time.perf_counter() - t0[0], 0.0])
            depth[0] += 1
            try:
                return fn(*args, **kwargs)
            finally:
                depth[0] -= 1
                rec[i][3] = time.perf_counter() - t0[0]
        return traced

    for mod, attr in _TRACED:
        m = importlib.import_module(mod)
        saved.append((m, attr, getattr(m, attr)))
        setattr(m, attr, wrap(attr, getattr(m, attr)))
    runs = []
    try:
        for _ in range(reps):
            rec.clear()
            torch.cuda.synchronize()
            t0[0] = time.perf_counter()
            step()
            runs.append([list(r) for r in rec])
            torch.cuda.synchronize()
    finally:
        for m, attr, fn in saved:
            setattr(m, attr, fn)
    runs = [r for r in runs if len(r) == len(runs[0])]
    return [(d, name, 1e3 * statistics.median(r[i][2] for r in runs), 1e3 * statistics.median(r[i][3] for r in runs))
            for i, (d, name, _, _) in enumerate(runs[0])]


def _calls_table(n, calls) -> str:
    lines = [f"N {n}: the host's calls in one step (ms since the step began: entry, exit, own span)"]
    for depth, name, t_in, t_out in calls:
        lines.append(f"  {t_in:7.3f} {t_out:7.3f} {t_out - t_in:7.3f}  {'  ' * depth}{name}")
    return "\n".join(lines)


def _waits_table(n, rows, idle_ms, ahead_ms) -> str:
    lines = [f"N {n}: step {idle_ms:.3f} ms from an idle GPU, {ahead_ms:.3f} ms with the host ahead "
             f"(GPU waits {idle_ms - ahead_ms:.3f} ms); per launch, ms since the step began:",
             f"  {'kernel':44s} {'host':>7s} {'idle':>8s} {'ahead':>8s} {'wait+':>7s}"]
    prev = 0.0
    for name, host, done_idle, done_ahead in rows:
        lag = done_idle - done_ahead
        lines.append(f"  {name[:44]:44s} {host:7.3f} {done_idle:8.3f} {done_ahead:8.3f} {lag - prev:7.3f}")
        prev = lag
    lines.append(f"  {'(end of step)':44s} {'':7s} {idle_ms:8.3f} {ahead_ms:8.3f} {idle_ms - ahead_ms - prev:7.3f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, nargs="+", default=[16384, 8192])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("host_profile"))
    p.add_argument("--launches-only", action="store_true", help="only the launch-by-launch waits (and --calls)")
    p.add_argument("--calls", action="store_true", help="also time the host's path call by call")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_host: needs a CUDA GPU", file=sys.stderr)
        return 2
    a.out.mkdir(parents=True, exist_ok=True)
    for n in a.seq_len:
        step = _step_fn(n, 2, 16, 128, 128, 8)
        for _ in range(5):
            step()
        table = _waits_table(n, *_launch_waits(step, a.steps))
        (a.out / f"launches_{n}.txt").write_text(table + "\n")
        print(table, flush=True)
        if a.calls:
            calls = _calls_table(n, _call_times(step, a.steps))
            (a.out / f"calls_{n}.txt").write_text(calls + "\n")
            print(calls, flush=True)
        if a.launches_only:
            continue
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
