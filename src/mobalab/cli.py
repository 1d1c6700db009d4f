"""The ``mobalab`` command line.

    mobalab list                                   experiments you can run
    mobalab run <experiment> [--out DIR] [--overwrite] [--quick] [--seed N] [--bench-csv CSV] [--no-progress]
    mobalab bench [...]                            kernel benchmark (GPU), see ``mobalab bench --help``
    mobalab bench --decode [...]                   decode-step benchmark (GPU), see ``mobalab bench --decode --help``
    mobalab design --head-dim D --seq-len N --top-k K --target P [...]
                                                   feasible block sizes, predicted accuracy, kernel cost

``run`` checks the output folder before it computes anything (it must be creatable and writable, and hold
no earlier result of the experiment unless ``--overwrite``), says what it will run and on which device,
and writes the result so that an interrupt never leaves a mixed set of files
(:mod:`mobalab.experiments._output`). Exit status: 0 done, 2 bad input, 130 interrupted, 141 stdout closed
(``mobalab list | head -1``; quietly, as a tool ended by SIGPIPE).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import re
import shlex
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["main"]

_SEED_MAX = 2**63 - 1  # the seed is written to the CSV as a 64-bit integer column


def _plain(text: str) -> str:
    """reStructuredText roles and literals as plain text: ``x`` -> x, :func:`x` -> x."""
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", text)
    return re.sub(r"`{1,2}([^`]+)`{1,2}", r"\1", text)


def _cmd_list(args) -> int:
    from mobalab import experiments

    for name in experiments.names():
        mod = experiments.get(name)
        first = (mod.__doc__ or "").strip().splitlines()[0] if mod.__doc__ else ""
        print(f"{name:20s} {_plain(first.split(':', 1)[-1].strip())}")
    return 0


# --------------------------------------------------------------------------------------------------
# argument types: argparse turns their ArgumentTypeError into "argument --x: <message>" and exit status 2


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not 0 <= value <= _SEED_MAX:
        raise argparse.ArgumentTypeError(f"the seed must be an integer from 0 to 2**63 - 1, got {text!r}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def _context(text: str) -> int:
    value = _count(text)
    if value < 2:  # a decode step needs a cached token before the new one
        raise argparse.ArgumentTypeError(f"a decode context is an integer >= 2 tokens, got {text!r}")
    return value


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _cosine(text: str) -> float:
    value = _number(text)
    if not -1.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"a cosine lies in [-1, 1], got {text!r}")
    return value


def _cosine_difference(text: str) -> float:
    value = _number(text)
    if not -2.0 <= value <= 2.0:
        raise argparse.ArgumentTypeError(f"a difference of two cosines lies in [-2, 2], got {text!r}")
    return value


def _probability(text: str) -> float:
    value = _number(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"a target probability lies strictly between 0 and 1, got {text!r}")
    return value


def _block_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(x) for x in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"block sizes must be integers like 32,64,128, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"block sizes must be positive integers, got {text!r}")
    return sizes


def _bench_csv_of(experiment: str, text) -> str:
    """The benchmark CSV ``text`` names for ``experiment`` (its module's ``find_bench_csv``: a path, ``recorded``
    or a recorded CSV's name); ValueError with the message less the experiment's prefix."""
    from mobalab import experiments

    find = experiments.get(experiment).find_bench_csv
    try:
        return str(find(text))
    except (FileNotFoundError, TypeError) as exc:
        raise ValueError(str(exc).removeprefix(f"{experiment}: ")) from None


def _bench_csv_type(experiment: str):
    """An argparse type: :func:`_bench_csv_of` for ``experiment``, its refusal as argparse reports it."""
    def parse(text: str) -> str:
        try:
            return _bench_csv_of(experiment, text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


# --------------------------------------------------------------------------------------------------
# run


#: the experiments whose Config takes ``bench_csv`` (each module has ``find_bench_csv``); spelled out here so
#: that the help and the refusal need not import every experiment (tests check it against the registry)
_BENCH_CSV_EXPERIMENTS = ("decode-cost", "kernel-speed")


def _config(mod, args):
    fields = {f.name for f in dataclasses.fields(mod.Config)}
    overrides = {}
    if args.seed is not None:
        overrides["seed"] = args.seed
    if args.bench_csv is not None:
        if "bench_csv" not in fields:
            raise ValueError(f"--bench-csv applies to {' and '.join(_BENCH_CSV_EXPERIMENTS)} only, not to "
                             f"{args.experiment}")
        try:  # each experiment resolves `recorded` to its own kind of benchmark
            overrides["bench_csv"] = _bench_csv_of(args.experiment, args.bench_csv)
        except ValueError as exc:
            raise ValueError(f"argument --bench-csv: {exc}") from None
    return mod.Config.quick(**overrides) if args.quick else dataclasses.replace(mod.Config(), **overrides)


def _command(args, config, df) -> str:
    """The command line that reruns this configuration, for the JSON record: the seed is spelled out (a
    later default could differ) and ``--bench-csv`` is the CSV the run read (by default found at run time:
    the table's ``source``), not what finding it would give elsewhere; ``--out`` is left to the reader."""
    parts = ["mobalab", "run", args.experiment] + (["--quick"] if args.quick else [])
    if getattr(config, "seed", None) is not None:
        parts += ["--seed", str(config.seed)]
    bench = getattr(config, "bench_csv", None)
    if bench is None and hasattr(config, "bench_csv") and "source" in df.columns:
        sources = df["source"].dropna().unique()
        bench = sources[0] if len(sources) == 1 else None
    if bench:
        parts += ["--bench-csv", str(bench)]
    return shlex.join(parts)


def _fallback_dir(name: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"mobalab-{name}-"))


def _cmd_run(args) -> int:
    import pandas as pd

    from mobalab import experiments
    from mobalab.experiments import _output

    name = args.experiment
    try:
        mod = experiments.get(name)
        config = _config(mod, args)
    except (ValueError, TypeError) as exc:
        print(f"mobalab run: {exc}", file=sys.stderr)
        return 2
    try:
        out, created = _output.prepare_out_dir(args.out or Path("runs") / name, name, overwrite=args.overwrite)
    except ValueError as exc:  # before any work: nothing computed, nothing lost
        print(f"mobalab run: {exc}", file=sys.stderr)
        return 2
    try:
        plan = mod.plan(config) if hasattr(mod, "plan") else ""
    except (FileNotFoundError, ValueError) as exc:
        _output.remove_if_empty(out, created)
        print(f"mobalab run: {exc}", file=sys.stderr)
        return 2
    try:
        print(f"{name}{' (quick)' if args.quick else ''}: {plan + '; ' if plan else ''}results go to {out}/",
              flush=True)
    except BrokenPipeError:  # nobody reads what the run says: stop before any work, leave no empty folder
        _output.remove_if_empty(out, created)
        raise

    t0 = time.perf_counter()
    try:
        df = mod.run(config, progress=not args.no_progress)
    except (FileNotFoundError, ValueError) as exc:  # missing inputs / unsupported setting: say it, no traceback
        _output.remove_if_empty(out, created)
        print(f"mobalab run: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _output.remove_if_empty(out, created)
        print(f"\nmobalab run: interrupted while computing; nothing was written ({out} is as it was)",
              file=sys.stderr)
        return 130
    extra = {"command": _command(args, config, df)}
    try:
        try:
            paths = _output.write_run(out, name, config, df, {"": mod.plot(df)}, extra)
        except OSError as exc:  # e.g. the disk filled up: keep the computed result somewhere else
            fallback = _fallback_dir(name)
            print(f"mobalab run: could not write to {out} ({exc}); writing to {fallback} instead", file=sys.stderr)
            try:
                paths = _output.write_run(fallback, name, config, df, {"": mod.plot(df)}, extra)
            except OSError as again:
                print(f"mobalab run: could not write to {fallback} either ({again})", file=sys.stderr)
                return 1
    except _output.InterruptedAfterWrite as exc:
        print(f"\nmobalab run: interrupted; the new result was already complete in {exc.paths['json'].parent}",
              file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        _output.remove_if_empty(out, created)
        print(f"\nmobalab run: interrupted while writing; {out} still holds what it held before (temporary "
              "files removed)", file=sys.stderr)
        return 130
    elapsed = time.perf_counter() - t0
    if hasattr(mod, "caption"):
        print(mod.caption(df))
    with pd.option_context("display.width", 160, "display.max_columns", 20, "display.precision", 3):
        print(mod.summary(df).to_string(index=False))
    print(f"\n{name}: {len(df)} rows in {elapsed:.1f} s" + (" (quick)" if args.quick else ""))
    for key, p in paths.items():
        print(f"  {key:5s} {p}")
    return 0


# --------------------------------------------------------------------------------------------------
# bench and design


@contextlib.contextmanager
def _program_name(name: str):
    """argparse names a program after sys.argv[0]: make usage lines read ``usage: mobalab bench``."""
    old = sys.argv[0] if sys.argv else None
    if sys.argv:
        sys.argv[0] = name
    else:
        sys.argv.append(name)
    try:
        yield
    finally:
        if old is None:
            sys.argv.pop(0)
        else:
            sys.argv[0] = old


def _run_benchmark(program: str, what: str, module: str, rest: list[str], no_gpu: str) -> int:
    """``module.main(rest)`` (``what``: "the attention benchmark", ...) in-process under the name ``program``; on
    a machine without a usable GPU the ``no_gpu`` message instead (``--help`` works anywhere)."""
    import importlib

    from mobalab.kernels import gpu_available

    if not ({"-h", "--help"} & set(rest)) and not gpu_available():
        print(f"{program}: {no_gpu}", file=sys.stderr)
        return 2
    try:
        bench = importlib.import_module(module)
    except ImportError as exc:
        print(f"{program}: {what} cannot be imported here: {exc}", file=sys.stderr)
        return 2
    with _program_name(program):
        try:
            rc = bench.main(rest)
        except SystemExit as exc:  # argparse: --help, bad arguments
            rc = exc.code
    return rc if isinstance(rc, int) else (0 if rc is None else 1)


def _cmd_bench(rest: list[str]) -> int:
    if "--decode" in rest:  # the decode benchmark (``python -m mobalab.bench.decode``)
        return _run_benchmark(
            "mobalab bench --decode", "the decode benchmark", "mobalab.bench.decode",
            [a for a in rest if a != "--decode"],
            "the decode benchmark times a MoBA decode step on a GPU and needs an NVIDIA GPU with CUDA and CuPy "
            "(pip install 'mobalab[gpu]'); none is usable here. Without a GPU, `mobalab run decode-cost` gives "
            "the byte model of a decode step (with --bench-csv recorded, next to the step times recorded on an "
            "H200)")
    from mobalab.bench import recorded_dir

    return _run_benchmark(
        "mobalab bench", "the attention benchmark", "mobalab.bench.attention", rest,
        "needs an NVIDIA GPU with CUDA and CuPy (pip install 'mobalab[gpu]'); none is usable here. Recorded H200 "
        f"results: `mobalab run kernel-speed` (forward; --bench-csv NAME for another), files in {recorded_dir()}")


def _cmd_design(args) -> int:
    from mobalab._design_command import decode_cost, design, format_decode_cost, format_design

    if not -1.0 <= args.mu_noise + args.delta_mu <= 1.0:
        print(f"mobalab design: the needle's cosine --mu-noise + --delta-mu = {args.mu_noise + args.delta_mu:g} "
              "lies outside [-1, 1]", file=sys.stderr)
        return 2
    if args.decode_context is None and args.seq_len < 2:
        print(f"mobalab design: the decode step is costed at --seq-len = {args.seq_len} unless --decode-context "
              "is given, and a decode context is >= 2 tokens: pass --decode-context N", file=sys.stderr)
        return 2
    if args.decode_heads % args.decode_kv_heads:
        print(f"mobalab design: --decode-heads ({args.decode_heads}) must be a multiple of --decode-kv-heads "
              f"({args.decode_kv_heads}): each kv head serves the same number of query heads", file=sys.stderr)
        return 2
    if args.decode_bench_csv is not None:  # a CSV of another kind is refused before any output
        from mobalab.experiments.decode_cost import read_decode_bench

        try:
            read_decode_bench(args.decode_bench_csv)
        except (ValueError, FileNotFoundError) as exc:
            print(f"mobalab design: argument --decode-bench-csv: {str(exc).removeprefix('decode-cost: ')}",
                  file=sys.stderr)
            return 2
    try:
        df = design(args.head_dim, args.seq_len, args.top_k, args.target, delta_mu=args.delta_mu, m=args.m,
                    mu_cluster=args.mu_cluster, mu_noise=args.mu_noise, causal=args.causal,
                    block_sizes=args.block_sizes, bench_csv=args.bench_csv)
    except ValueError as exc:
        print(f"mobalab design: {exc}", file=sys.stderr)
        return 2
    print(format_design(df))
    try:
        cost = decode_cost(df, args.decode_context or args.seq_len, batch=args.decode_batch,
                           heads=args.decode_heads, kv_heads=args.decode_kv_heads, bench_csv=args.decode_bench_csv,
                           centroid_precision=args.decode_centroid_precision)
    except (ValueError, FileNotFoundError) as exc:
        print(f"mobalab design: {exc}", file=sys.stderr)
        return 2
    print()
    print(format_decode_cost(cost))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mobalab", description="Predict, simulate and measure MoBA routing.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the experiments")
    r = sub.add_parser("run", help="run an experiment: writes CSV, PNG figure(s) and a JSON record",
                       description="Run an experiment. Before computing, checks that --out can be created and "
                                   "written and holds no earlier result (unless --overwrite), and says which "
                                   "device it uses. Writes <experiment>.csv, .png and .json (config, "
                                   "environment, and each file's size and SHA-256) all or nothing: Ctrl-C "
                                   "leaves the folder as it was.")
    r.add_argument("experiment", help="experiment name (see `mobalab list`)")
    r.add_argument("--out", help="output folder (default: runs/<experiment> under the working directory)")
    r.add_argument("--overwrite", action="store_true", help="replace an earlier result in --out")
    r.add_argument("--quick", action="store_true", help="small, fast configuration (CPU, well under a minute)")
    r.add_argument("--seed", type=_seed, default=None, help="random seed, 0 .. 2**63-1 (default: the config's, 0)")
    r.add_argument("--bench-csv", default=None, metavar="CSV",
                   help="the benchmark CSV of kernel-speed or decode-cost: a path, `recorded` or a recorded CSV's "
                        "name (see mobalab.bench.recorded_files). kernel-speed: a `mobalab bench` CSV (bench.csv "
                        "or bench_bwd.csv); `recorded` is the recorded H200 forward CSV; default: "
                        "$MOBALAB_BENCH_CSV, the newest runs/bench/ CSV, a quick benchmark on a GPU, else "
                        "`recorded`. decode-cost: a `mobalab bench --decode` CSV (decode.csv) of measured step "
                        "times; `recorded` is the newest recorded H200 decode CSV; default: "
                        "$MOBALAB_DECODE_BENCH_CSV, else none (bytes only)")
    r.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    from mobalab._design_command import DEFAULT_BLOCK_SIZES

    ds = sub.add_parser("design", help="feasible block sizes for a target routing accuracy, and their kernel cost")
    ds.add_argument("--head-dim", type=_count, required=True, help="head dim d")
    ds.add_argument("--seq-len", type=_count, required=True, help="context length N (tokens)")
    ds.add_argument("--top-k", type=_count, required=True, help="blocks selected per query (the own block included)")
    ds.add_argument("--target", type=_probability, required=True, help="target P(hit), e.g. 0.99")
    ds.add_argument("--delta-mu", type=_cosine_difference, default=0.3,
                    help="needle cosine minus noise cosine (default 0.3)")
    ds.add_argument("--m", type=_count, default=1, help="keys of the needle's block with elevated cosine, needle "
                                                       "included, an integer >= 1 (default 1)")
    ds.add_argument("--mu-cluster", type=_cosine, default=None,
                    help="cosine of the clustered keys, in [-1, 1] (default: mu_noise + delta_mu)")
    ds.add_argument("--mu-noise", type=_cosine, default=0.0, help="cosine of noise keys, in [-1, 1] (default 0)")
    mode = ds.add_mutually_exclusive_group()
    mode.add_argument("--causal", dest="causal", action="store_true", default=True,
                      help="causal MoBA: own block forced, averaged over positions (default)")
    mode.add_argument("--non-causal", dest="causal", action="store_false", help="plain top-k over all blocks")
    ds.add_argument("--block-sizes", type=_block_sizes, default=DEFAULT_BLOCK_SIZES,
                    help="candidate block sizes, comma separated (default 16,32,64,128,256,512)")
    ds.add_argument("--bench-csv", type=_bench_csv_type("kernel-speed"), default=None, metavar="CSV",
                    help="kernel cost from a `mobalab bench` CSV: bench.csv (forward; columns seqlen, head_dim, "
                         "block, top_k, workload, variant, mobalab_ms) or bench_bwd.csv (fwdbwd_ms); `recorded` "
                         "for the recorded H200 forward CSV. Takes the random workload and the tile kernel "
                         "the automatic choice runs, and says which")
    ds.add_argument("--decode-context", type=_context, default=None, metavar="N",
                    help="context (tokens, >= 2) at which to cost one decode step of the recommended (B, top-k): "
                         "the largest feasible B (default: --seq-len)")
    ds.add_argument("--decode-batch", type=_count, default=8, help="sequences per decode step (default 8)")
    ds.add_argument("--decode-heads", type=_count, default=32, metavar="H",
                    help="query heads of the decoding model (default 32)")
    ds.add_argument("--decode-kv-heads", type=_count, default=8, metavar="H",
                    help="kv heads (GQA), a divisor of --decode-heads (default 8)")
    ds.add_argument("--decode-bench-csv", type=_bench_csv_type("decode-cost"), default=None, metavar="CSV",
                    help="measured decode step times: decode.csv of `mobalab bench --decode`, `recorded` (the "
                         "newest recorded H200 decode CSV) or a recorded CSV's name")
    # kernels._contract.CENTROID_PRECISIONS, spelled out: importing the contract would load torch for every command
    ds.add_argument("--decode-centroid-precision", choices=("fp32", "input"), default="fp32",
                    help="the decode router's centroids: fp32 block sums (default) or the means rounded to the "
                         "cache's dtype (centroid_precision='input': half the routing bytes)")
    sub.add_parser("bench", help="GPU kernel benchmark against FlashAttention-2 and cuDNN (arguments passed on; "
                                 "see `mobalab bench --help`); `mobalab bench --decode` times decode steps "
                                 "against dense decode (see `mobalab bench --decode --help`)", add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the ``mobalab`` command line with ``argv`` (default: ``sys.argv[1:]``); returns the exit status.

    Examples
    --------
    >>> from mobalab.cli import main
    >>> main(["design", "--head-dim", "64", "--seq-len", "8192", "--top-k", "8", "--target", "0.9", "--m", "2.5"])
    2
    """
    try:
        rc = _dispatch(list(sys.argv[1:] if argv is None else argv))
        sys.stdout.flush()  # a reader that has gone shows up here, inside the handler, not at interpreter exit
    except BrokenPipeError:
        return _stdout_gone()
    return rc


def _dispatch(argv: list[str]) -> int:
    if argv[:1] == ["bench"]:
        return _cmd_bench(argv[1:])
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse printed the usage and the error (or the help)
        return exc.code if isinstance(exc.code, int) else 2
    if args.command == "list":
        return _cmd_list(args)
    if args.command == "design":
        return _cmd_design(args)
    return _cmd_run(args)


def _stdout_gone() -> int:
    """Stop quietly when the reader of stdout has gone (``mobalab list | head -1``).

    Python ignores SIGPIPE, so writing to a closed pipe raises BrokenPipeError where a C program would simply
    be ended by the signal. Pointing stdout at devnull keeps the interpreter's final flush of what is still
    buffered from raising it again. The status is 141 (128 + SIGPIPE), what the shell reports for a tool the
    signal ended, so ``set -o pipefail`` scripts see mobalab as they see ``cat`` or ``grep``.
    """
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # no file behind sys.stdout (output captured or replaced)
        return 141
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, fd)
        finally:
            os.close(devnull)
    return 141


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
