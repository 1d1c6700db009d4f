"""Side-by-side timing of a few ways of doing one thing in one process (the A/B scripts under ``scripts/``), or of
two source trees in processes of their own (:func:`tree_arm_rows`).

The arms are timed in alternating order, forward on even rounds and reversed on odd ones, so that clock ramps,
thermal drift and whatever ran just before land on every arm alike; the first rounds can be dropped (the first
timings of a process run slow while the clocks ramp up).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import pkgutil
import re
import statistics
import subprocess
import sys
from pathlib import Path

import torch

__all__ = ["interleaved_times", "idle_gpu_ms", "time_arms", "extra_defines", "build_options", "parse_build_option",
           "is_build_define", "print_point_rows", "tree_arm_rows"]

_BUILD_DEFINE = r"MOBA_[A-Z0-9_]+=-?\d+"  # one kernel build option, NAME=INTEGER
_BUILD_OPTION = re.compile(rf"(?P<source>[a-z0-9_]+\.cu):(?P<define>{_BUILD_DEFINE})")


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


def is_build_define(text: str) -> bool:
    """Whether ``text`` is one kernel build option as the sources read them: ``MOBA_NAME=INTEGER``."""
    return re.fullmatch(_BUILD_DEFINE, text) is not None


def parse_build_option(text: str) -> tuple[str, str]:
    """``"topk_wgmma.cu:MOBA_TOPK_WG_STEP_DESC=0"`` -> ``("topk_wgmma.cu", "MOBA_TOPK_WG_STEP_DESC=0")``: a kernel
    source of ``mobalab/kernels/cuda/`` and one of its build options. ValueError, naming the accepted form and the
    sources there are, for anything else."""
    from mobalab.kernels._build import CUDA_DIR

    m = _BUILD_OPTION.fullmatch(text)
    sources = sorted(f.name for f in CUDA_DIR.iterdir() if f.name.endswith(".cu"))
    if m is None or m["source"] not in sources:
        raise ValueError(f"build option {text!r}: expected SOURCE.cu:MOBA_NAME=INTEGER with SOURCE.cu one of "
                         f"{', '.join(sources)}")
    return m["source"], m["define"]


def build_option_arg(text: str) -> str:
    """An argparse ``type`` for ``--build-option``: ``text`` as given, or :func:`parse_build_option`'s message as the
    argument's error."""
    try:
        parse_build_option(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _launching_modules() -> list:
    """The kernel wrapper modules that launch through their own name ``launch`` (what extra_defines patches)."""
    import mobalab.kernels

    names = (m.name for m in pkgutil.iter_modules(mobalab.kernels.__path__) if m.name != "_launch")
    return [mod for mod in (importlib.import_module(f"mobalab.kernels.{n}") for n in names) if hasattr(mod, "launch")]


@contextlib.contextmanager
def build_options(options):
    """Within the block, every launch of mobalab's kernels from a source named in ``options`` (``"SOURCE.cu:
    MOBA_NAME=VALUE"`` strings, see :func:`parse_build_option`) is compiled with those build options as well, in
    every kernel wrapper module: a whole benchmark run of a build option that is not the default yet."""
    by_source: dict[str, list[str]] = {}
    for text in options:
        source, define = parse_build_option(text)
        by_source.setdefault(source, []).append(define)
    with contextlib.ExitStack() as stack:
        for module in _launching_modules() if by_source else ():  # a run without options imports nothing more
            for source, defines in by_source.items():
                stack.enter_context(extra_defines(module, source, tuple(defines)))
        yield


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
