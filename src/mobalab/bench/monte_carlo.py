"""Monte Carlo throughput: trials per second of the score-level and vector-level routers.

    python -m mobalab.bench.monte_carlo [--csv out.csv] [--min-seconds 2] [--backends numpy torch-cpu cuda]

Configuration (the paper's d = 64, B = 128 design point at 64K context): head_dim 64, block_size 128,
seq_len 65536 (n = 512 blocks), top_k 8, causal and non-causal. Score level: numpy, binomial and explicit
samplers. Vector level: numpy on CPU, torch on CPU, and torch on CUDA when a GPU is visible.

Each row is timed on a fresh seed after one warm-up call; the trial count grows until a call lasts at
least ``--min-seconds`` (so per-call overhead does not dominate). Prints a markdown table headed by the
environment record (:func:`mobalab.bench.environment`: date, CPU, GPU, versions, commit); ``--csv PATH``
also writes the rows, with that record in columns.
"""

from __future__ import annotations

import argparse
import sys
import time

import pandas as pd

from mobalab.bench.environment import environment
from mobalab.simulate import score_level_router, score_level_router_causal, vector_level_router

__all__ = ["measure", "main"]

D, B, N, K = 64, 128, 65536, 8
# A middling hit rate at this design point (about SNR 1.3): the rate does not affect the speed, but a
# visible estimate is a sanity check on the run.
MU_SIGNAL, M, MU_CLUSTER = 0.5, 8, 0.3
SCORE_SNR = 1.3
BACKENDS = ("numpy", "torch-cpu", "cuda")


def _sync():
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(run, start_trials: int, min_seconds: float, max_trials: int):
    """Call ``run(trials, seed)`` with growing trial counts until one call lasts ``min_seconds``."""
    run(max(1, min(start_trials // 8, max_trials)), 0)  # warm-up: imports, allocator, CUDA context
    trials, seed = min(start_trials, max_trials), 1
    while True:
        t0 = time.perf_counter()
        df = run(trials, seed)
        _sync()
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds or trials >= max_trials:
            return df, trials, elapsed
        trials = min(max_trials, trials * max(2, int(min_seconds / max(elapsed, 1e-3))))
        seed += 1


def _score_cases():
    for sampler, start in (("binomial", 100_000), ("explicit", 2_000)):
        yield ("score-level", sampler, False, start,
               lambda t, s, sampler=sampler: score_level_router(SCORE_SNR, N // B, K, trials=t, seed=s,
                                                                method=sampler))
        yield ("score-level", sampler, True, start,
               lambda t, s, sampler=sampler: score_level_router_causal(SCORE_SNR, N, B, K, trials=t, seed=s,
                                                                       method=sampler))


def _vector_cases(backends):
    for backend in backends:
        device = {"numpy": "cpu", "torch-cpu": "torch-cpu", "cuda": "cuda"}[backend]
        start = 2_000 if backend == "cuda" else 4
        for causal in (False, True):
            yield ("vector-level", backend, causal, start,
                   lambda t, s, device=device, causal=causal: vector_level_router(
                       D, N, B, K, MU_SIGNAL, m=M, mu_cluster=MU_CLUSTER, causal=causal, trials=t, seed=s,
                       device=device))


def measure(backends=None, min_seconds: float = 2.0, max_trials: int = 50_000_000, score: bool = True,
            progress=None) -> pd.DataFrame:
    """Time every router; one tidy row per (router, sampler or backend, causal).

    Parameters
    ----------
    backends : sequence of {"numpy", "torch-cpu", "cuda"}, optional
        Vector-level backends (default: numpy, torch-cpu, and cuda when torch sees a GPU).
    min_seconds : float
        Shortest timed call; the trial count grows until a call lasts this long.
    max_trials : int
        Cap on the trials of one call (a call at the cap is kept even when shorter).
    score : bool
        Also time the score-level samplers.
    progress : callable, optional
        Called with each finished row (a dict), e.g. to print it.

    Returns
    -------
    pandas.DataFrame
        Columns router, implementation, causal, head_dim, block_size, seq_len, n_blocks, top_k, trials,
        seconds, trials_per_s, estimate (the hit rate, a sanity check).

    Examples
    --------
    >>> from mobalab.bench.monte_carlo import measure
    >>> df = measure(backends=[], min_seconds=0.0, max_trials=2_000)
    >>> sorted(set(df["implementation"])), len(df)
    (['binomial', 'explicit'], 4)
    """
    import torch

    has_cuda = torch.cuda.is_available()
    backends = list(backends) if backends is not None else ["numpy", "torch-cpu"] + (["cuda"] if has_cuda else [])
    bad = [b for b in backends if b not in BACKENDS]
    if bad:
        raise ValueError(f"backends must be drawn from {BACKENDS}, got {bad}")
    if "cuda" in backends and not has_cuda:
        raise ValueError("backends asks for 'cuda', but torch sees no CUDA device")
    if not min_seconds >= 0:
        raise ValueError(f"min_seconds must be >= 0, got {min_seconds!r}")
    if isinstance(max_trials, bool) or not isinstance(max_trials, int) or max_trials < 1:
        raise ValueError(f"max_trials must be an integer >= 1, got {max_trials!r}")
    rows = []
    cases = [*(_score_cases() if score else ()), *_vector_cases(backends)]
    for router, impl, causal, start, run in cases:
        df, trials, elapsed = _timed(run, start, min_seconds, max_trials)
        rows.append({"router": router, "implementation": impl, "causal": causal, "head_dim": D, "block_size": B,
                     "seq_len": N, "n_blocks": N // B, "top_k": K, "trials": trials, "seconds": elapsed,
                     "trials_per_s": trials / elapsed, "estimate": float(df["estimate"].iloc[0])})
        if progress is not None:
            progress(rows[-1])
    return pd.DataFrame(rows)


def _markdown(df: pd.DataFrame, env: dict) -> str:
    gpu = env.get("cuda_device") or "none"
    lines = [f"# Monte Carlo throughput ({env['utc']})", "",
             f"- machine: {env['cpu']}, {env['cpu_count']} logical cores; GPU: {gpu}",
             f"- numpy {env['numpy']}, torch {env['torch']}, Python {env['python']}, "
             f"commit {env['git_commit'] or 'unknown'}",
             f"- d={D}, B={B}, N={N} (n={N // B}), k={K}; vector level: mu_signal={MU_SIGNAL}, m={M}, "
             f"mu_cluster={MU_CLUSTER}, isotropic; score level: SNR={SCORE_SNR}, sd_ratio=1", "",
             "| router | sampler / backend | causal | trials | seconds | trials/s | hit rate |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in df.itertuples(index=False):
        lines.append(f"| {r.router} | {r.implementation} | {r.causal} | {r.trials} | {r.seconds:.2f} | "
                     f"{r.trials_per_s:,.1f} | {r.estimate:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    """``python -m mobalab.bench.monte_carlo``: time the routers, print a markdown table; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m mobalab.bench.monte_carlo", description=__doc__.split("\n")[0])
    parser.add_argument("--csv", help="also write the rows (with the environment record) to this CSV file")
    parser.add_argument("--min-seconds", type=float, default=2.0, help="shortest timed call (default 2)")
    parser.add_argument("--max-trials", type=int, default=50_000_000, help="cap on trials per call")
    parser.add_argument("--backends", nargs="*", default=None, choices=list(BACKENDS),
                        help="vector-level backends (default: numpy, torch-cpu, and cuda when available; "
                             "none: score level only)")
    args = parser.parse_args(argv)

    def show(r):
        print(f"  {r['router']:12s} {r['implementation']:9s} causal={r['causal']!s:5s} "
              f"{r['trials_per_s']:12.1f} trials/s", file=sys.stderr)

    try:
        df = measure(args.backends, args.min_seconds, args.max_trials, progress=show)
    except ValueError as exc:
        parser.error(str(exc))
    env = environment()
    print(_markdown(df, env))
    if args.csv:
        df.assign(date=env["utc"], machine=f"{env['cpu']}, {env['cpu_count']} logical cores",
                  gpu=env.get("cuda_device") or "none", git_commit=env["git_commit"]).to_csv(args.csv, index=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
