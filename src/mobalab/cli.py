"""The ``mobalab`` command line.

    mobalab list                                   experiments you can run
    mobalab run <experiment> [--out DIR] [--quick] [--seed N] [--no-progress]
    mobalab bench [...]                            kernel benchmark (GPU), see ``mobalab bench --help``
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

__all__ = ["main"]


def _cmd_list(args) -> int:
    from mobalab import experiments

    for name in experiments.names():
        mod = experiments.get(name)
        first = (mod.__doc__ or "").strip().splitlines()[0] if mod.__doc__ else ""
        print(f"{name:20s} {first.split(':', 1)[-1].strip()}")
    return 0


def _cmd_run(args) -> int:
    import pandas as pd

    from mobalab import experiments
    from mobalab.experiments._output import write_run

    try:
        mod = experiments.get(args.experiment)
    except ValueError as exc:
        print(f"mobalab: {exc}", file=sys.stderr)
        return 2
    overrides = {}
    if args.seed is not None:
        overrides["seed"] = args.seed
    config = mod.Config.quick(**overrides) if args.quick else dataclasses.replace(mod.Config(), **overrides)
    out = Path(args.out) if args.out else Path("runs") / args.experiment
    t0 = time.perf_counter()
    df = mod.run(config, progress=not args.no_progress)
    figures = {"": mod.plot(df)}
    paths = write_run(out, args.experiment, config, df, figures)
    elapsed = time.perf_counter() - t0
    with pd.option_context("display.width", 140, "display.max_columns", 20, "display.precision", 3):
        print(mod.summary(df).to_string(index=False))
    print(f"\n{args.experiment}: {len(df)} rows in {elapsed:.1f} s" + (" (quick)" if args.quick else ""))
    for key, p in paths.items():
        print(f"  {key:5s} {p}")
    return 0


def _cmd_bench(args, rest) -> int:
    try:
        from mobalab.kernels import bench
    except ImportError as exc:  # pragma: no cover - depends on the checkout
        print(f"mobalab: the kernel benchmark is not available: {exc}", file=sys.stderr)
        return 2
    return int(bench.main(rest) or 0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mobalab", description="Predict, simulate and measure MoBA routing.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the experiments")
    r = sub.add_parser("run", help="run an experiment: writes CSV, JSON config and PNG figure(s)")
    r.add_argument("experiment", help="experiment name (see `mobalab list`)")
    r.add_argument("--out", help="output folder (default: runs/<experiment>)")
    r.add_argument("--quick", action="store_true", help="small, fast configuration (CPU, well under a minute)")
    r.add_argument("--seed", type=int, default=None, help="random seed (default: the config's, 0)")
    r.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    sub.add_parser("bench", help="GPU kernel benchmark against FlashAttention-2 and cuDNN (arguments passed on)",
                   add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        return _cmd_bench(None, argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "list":
        return _cmd_list(args)
    return _cmd_run(args)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
