"""Side-by-side timing of a few ways of doing one thing in one process (the A/B scripts under ``scripts/``), or of
two source trees in processes of their own (:func:`tree_arm_rows`).

The arms are timed in alternating order, forward on even rounds and reversed on odd ones, so that clock ramps,
thermal drift and whatever ran just before land on every arm alike; the first rounds can be dropped (the first
timings of a process run slow while the clocks ramp up).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

__all__ = ["interleaved_times", "idle_gpu_ms", "time_arms", "extra_defines", "print_point_rows", "tree_arm_rows"]


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


def time_arms(call, arms, rounds: int, drop: int = 2) -> tuple[dict, dict]:
    """``(results, medians)``: each arm's result of one warm-up ``call(arm)`` (it compiles; the A/B scripts compare
    the arms' outputs with it), and the median ms of ``call(arm)`` from an idle GPU over ``rounds`` interleaved
    rounds, the first ``drop`` not kept."""
    results = {arm: call(arm) for arm in arms}
    times = interleaved_times({arm: arm for arm in arms}, rounds, lambda arm: idle_gpu_ms(lambda: call(arm)), drop)
    return results, {arm: statistics.median(ms) for arm, ms in times.items()}


@contextlib.contextmanager
def extra_defines(module, source: str, defines: tuple[str, ...]):
    """Within the block, every launch of cuda/``source`` made through ``module.launch`` (a kernel wrapper module's
    name for :func:`mobalab.kernels._launch.launch`) is compiled with ``defines`` as well: its own module, so a
    kernel build option can be timed against the default build in one process."""
    if not defines:
        yield
        return
    real = module.launch

    def launch(plan):
        return real(dataclasses.replace(plan, defines=plan.defines + defines) if plan.source == source else plan)

    module.launch = launch
    try:
        yield
    finally:
        module.launch = real


def print_point_rows(script: str, points, run_point, header: str, row_text) -> int:
    """The A/B scripts' output: ``header`` (a markdown table head), then ``row_text(point, row)`` for every row of
    ``run_point(point)`` over ``points``, each line flushed as it comes. 2 (and a message) without a CUDA GPU."""
    if not torch.cuda.is_available():
        print(f"{script}: needs a CUDA GPU", file=sys.stderr)
        return 2
    print(header)
    for point in points:
        for row in run_point(point):
            print(row_text(point, row), flush=True)
    return 0


def tree_arm_rows(script, src, args) -> list[dict]:
    """One arm of a comparison between two source trees: ``script --child ARGS`` run with ``src`` (a directory
    holding ``mobalab/``) as the path's only mobalab (a process imports one), and the JSON rows it prints (its
    stdout lines that start with "{"). A failed arm raises RuntimeError with the end of its stderr."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    proc = subprocess.run([sys.executable, str(script), "--child", *map(str, args)], env=env, capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{Path(script).name}: the arm of {src} failed:\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
