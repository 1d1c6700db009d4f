"""The ``mobalab`` command line.

    mobalab list                                   experiments you can run
    mobalab run <experiment> [--out DIR] [--quick] [--seed N] [--no-progress]
    mobalab bench [...]                            kernel benchmark (GPU), see ``mobalab bench --help``
    mobalab design --head-dim D --seq-len N --top-k K --target P [...]
                                                   feasible block sizes, predicted accuracy, kernel cost
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
    try:
        df = mod.run(config, progress=not args.no_progress)
    except (FileNotFoundError, ValueError) as exc:  # missing inputs / unsupported setting: say it, no traceback
        print(f"mobalab: {exc}", file=sys.stderr)
        return 2
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
    from mobalab.kernels import gpu_available

    if not ({"-h", "--help"} & set(rest)) and not gpu_available():
        print("mobalab bench: needs an NVIDIA GPU with CUDA and CuPy (pip install 'mobalab[gpu]'); "
              "none is usable here. Recorded results: RESULTS.md", file=sys.stderr)
        return 2
    from mobalab.kernels import bench

    return int(bench.main(rest) or 0)


def _block_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(x) for x in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"block sizes must be integers like 32,64,128, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"block sizes must be positive integers, got {text!r}")
    return sizes


def _cmd_design(args) -> int:
    from mobalab.experiments.design import design, format_design

    try:
        df = design(args.head_dim, args.seq_len, args.top_k, args.target, delta_mu=args.delta_mu, m=args.m,
                    mu_cluster=args.mu_cluster, mu_noise=args.mu_noise, causal=args.causal,
                    block_sizes=args.block_sizes, bench_csv=args.bench_csv)
    except ValueError as exc:
        print(f"mobalab design: {exc}", file=sys.stderr)
        return 2
    print(format_design(df))
    return 0


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
    from mobalab.experiments.design import DEFAULT_BLOCK_SIZES

    ds = sub.add_parser("design", help="feasible block sizes for a target routing accuracy, and their kernel cost")
    ds.add_argument("--head-dim", type=int, required=True, help="head dim d")
    ds.add_argument("--seq-len", type=int, required=True, help="context length N (tokens)")
    ds.add_argument("--top-k", type=int, required=True, help="blocks selected per query (the own block included)")
    ds.add_argument("--target", type=float, required=True, help="target P(hit), e.g. 0.99")
    ds.add_argument("--delta-mu", type=float, default=0.3, help="needle cosine minus noise cosine (default 0.3)")
    ds.add_argument("--m", type=float, default=1, help="keys of the needle's block with elevated cosine, needle "
                                                      "included (default 1)")
    ds.add_argument("--mu-cluster", type=float, default=None,
                    help="cosine of the clustered keys (default: mu_noise + delta_mu)")
    ds.add_argument("--mu-noise", type=float, default=0.0, help="cosine of noise keys (default 0)")
    mode = ds.add_mutually_exclusive_group()
    mode.add_argument("--causal", dest="causal", action="store_true", default=True,
                      help="causal MoBA: own block forced, averaged over positions (default)")
    mode.add_argument("--non-causal", dest="causal", action="store_false", help="plain top-k over all blocks")
    ds.add_argument("--block-sizes", type=_block_sizes, default=DEFAULT_BLOCK_SIZES,
                    help="candidate block sizes, comma separated (default 16,32,64,128,256,512)")
    ds.add_argument("--bench-csv", default=None,
                    help="kernel benchmark CSV (impl, block_size, seq_len, head_dim, ms) for the expected cost")
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
    if args.command == "design":
        return _cmd_design(args)
    return _cmd_run(args)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
