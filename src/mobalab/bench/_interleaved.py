"""Side-by-side timing of a few ways of doing one thing in one process (the A/B scripts under ``scripts/``).

The arms are timed in alternating order, forward on even rounds and reversed on odd ones, so that clock ramps,
thermal drift and whatever ran just before land on every arm alike; the first rounds can be dropped (the first
timings of a process run slow while the clocks ramp up).
"""

from __future__ import annotations

import torch

__all__ = ["interleaved_times", "idle_gpu_ms"]


def interleaved_times(arms: dict, rounds: int, timer, drop: int = 0) -> dict[object, list[float]]:
    """``{label: [ms of each kept round]}``: ``timer(arms[label])`` once per arm and round, ``rounds`` rounds in
    alternating order, the first ``drop`` rounds not kept."""
    order = list(arms)
    times: dict[object, list[float]] = {label: [] for label in order}
    for r in range(rounds):
        for label in order if r % 2 == 0 else order[::-1]:
            ms = timer(arms[label])
            if r >= drop:
                times[label].append(ms)
    return times


def idle_gpu_ms(fn) -> float:
    """One call of ``fn`` timed by CUDA events from an idle GPU (the host's launch time included)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)
