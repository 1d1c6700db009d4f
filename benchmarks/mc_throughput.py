"""Monte Carlo throughput: trials per second of the score-level and vector-level routers.

Configuration (the paper's d = 64, B = 128 design point at 64K context): head_dim 64, block_size 128,
seq_len 65536 (n = 512 blocks), top_k 8, causal and non-causal. Score level: numpy, binomial and explicit
samplers. Vector level: numpy on CPU, torch on CPU, and torch on CUDA when a GPU is visible.

Each row is timed on a fresh seed after one warm-up call; the trial count doubles until a run lasts at
least ``--min-seconds`` (so per-call overhead does not dominate). Prints a markdown table headed by the
date, machine and versions; ``--csv PATH`` also writes the rows.

    python benchmarks/mc_throughput.py [--csv out.csv] [--min-seconds 2] [--backends numpy torch-cpu cuda]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import time

import numpy as np
import pandas as pd

from mobalab.bench.environment import git_commit
from mobalab.simulate import score_level_router, score_level_router_causal, vector_level_router

D, B, N, K = 64, 128, 65536, 8
# A middling hit rate at this design point (about SNR 1.3): the rate does not affect the speed, but a
# visible estimate is a sanity check on the run.
MU_SIGNAL, M, MU_CLUSTER = 0.5, 8, 0.3
SCORE_SNR = 1.3


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def timed(run, start_trials: int, min_seconds: float, max_trials: int):
    """Call ``run(trials, seed)`` with doubling trials until one call lasts ``min_seconds``."""
    run(max(1, start_trials // 8), 0)  # warm-up: imports, allocator, CUDA context
    trials, seed = start_trials, 1
    while True:
        t0 = time.perf_counter()
        df = run(trials, seed)
        sync()
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds or trials >= max_trials:
            return df, trials, elapsed
        trials = min(max_trials, trials * max(2, int(min_seconds / max(elapsed, 1e-3))))
        seed += 1


def sync():
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.synchronize()


def score_cases():
    for sampler, start in (("binomial", 100_000), ("explicit", 2_000)):
        yield (
            "score-level",
            sampler,
            False,
            lambda t, s, sampler=sampler: score_level_router(
                SCORE_SNR, N // B, K, trials=t, seed=s, method=sampler
            ),
            start,
        )
        yield (
            "score-level",
            sampler,
            True,
            lambda t, s, sampler=sampler: score_level_router_causal(
                SCORE_SNR, N, B, K, trials=t, seed=s, method=sampler
            ),
            start,
        )


def vector_cases(backends):
    for backend in backends:
        device = {"numpy": "cpu", "torch-cpu": "torch-cpu", "cuda": "cuda"}[backend]
        start = 2_000 if backend == "cuda" else 4
        for causal in (False, True):
            yield (
                "vector-level",
                backend,
                causal,
                lambda t, s, device=device, causal=causal: vector_level_router(
                    D,
                    N,
                    B,
                    K,
                    MU_SIGNAL,
                    m=M,
                    mu_cluster=MU_CLUSTER,
                    causal=causal,
                    trials=t,
                    seed=s,
                    device=device,
                ),
                start,
            )


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--csv", help="also write the rows to this CSV file")
    parser.add_argument("--min-seconds", type=float, default=2.0, help="shortest timed call (default 2)")
    parser.add_argument("--max-trials", type=int, default=50_000_000, help="cap on trials per call")
    parser.add_argument(
        "--backends",
        nargs="+",
        default=None,
        choices=["numpy", "torch-cpu", "cuda"],
        help="vector-level backends (default: numpy, torch-cpu, and cuda when available)",
    )
    args = parser.parse_args(argv)

    import torch

    has_cuda = torch.cuda.is_available()
    backends = args.backends or (["numpy", "torch-cpu"] + (["cuda"] if has_cuda else []))
    if "cuda" in backends and not has_cuda:
        parser.error("--backends cuda asked for, but torch sees no CUDA device")

    rows = []
    for router, impl, causal, run, start in [*score_cases(), *vector_cases(backends)]:
        df, trials, elapsed = timed(run, start, args.min_seconds, args.max_trials)
        rows.append(
            {
                "router": router,
                "implementation": impl,
                "causal": causal,
                "head_dim": D,
                "block_size": B,
                "seq_len": N,
                "n_blocks": N // B,
                "top_k": K,
                "trials": trials,
                "seconds": elapsed,
                "trials_per_s": trials / elapsed,
                "estimate": float(df.estimate.iloc[0]),
            }
        )
        print(
            f"  {router:12s} {impl:9s} causal={causal!s:5s} {trials / elapsed:12.1f} trials/s",
            file=sys.stderr,
        )

    out = pd.DataFrame(rows)
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    machine = f"{cpu_model()}, {os.cpu_count()} logical cores"
    gpu = torch.cuda.get_device_name(0) if has_cuda else "none"
    print(f"# Monte Carlo throughput ({now})\n")
    print(f"- machine: {machine}; GPU: {gpu}")
    print(
        f"- numpy {np.__version__}, torch {torch.__version__}, Python {platform.python_version()}, "
        f"commit {git_commit() or 'unknown'}"
    )
    print(
        f"- d={D}, B={B}, N={N} (n={N // B}), k={K}; vector level: mu_signal={MU_SIGNAL}, m={M}, "
        f"mu_cluster={MU_CLUSTER}, isotropic; score level: SNR={SCORE_SNR}, sd_ratio=1\n"
    )
    print("| router | sampler / backend | causal | trials | seconds | trials/s | hit rate |")
    print("|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['router']} | {r['implementation']} | {r['causal']} | {r['trials']} | {r['seconds']:.2f} | "
            f"{r['trials_per_s']:,.1f} | {r['estimate']:.3f} |"
        )
    if args.csv:
        out.assign(date=now, machine=machine, gpu=gpu).to_csv(args.csv, index=False)
    return out


if __name__ == "__main__":
    main()
