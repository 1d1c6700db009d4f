r"""kernel-speed: latency, speedup, useful TFLOP/s and peak memory of the MoBA kernels, from the benchmark CSV.

Reads the ``bench.csv`` that ``python -m mobalab.kernels.bench --out DIR`` (also ``mobalab bench --out DIR``)
writes on a GPU: one row per configuration with mobalab's forward, FlashAttention-2 (torch SDPA
FLASH_ATTENTION) and cuDNN (CUDNN_ATTENTION) side by side; ``bench_env.json`` beside it names the device.
It turns that into a tidy table (one row per configuration and method) and a figure: latency and speedup
over the context length, useful TFLOP/s (routing + attention on the selected tokens for mobalab, the dense
causal count for FA2 / cuDNN), peak memory, and latency against the block size.

Which CSV (``Config.bench_csv``; ``mobalab run kernel-speed`` has no flag for it):

1. the environment variable ``MOBALAB_BENCH_CSV``, when set;
2. else the newest ``runs/bench/*.csv`` or ``runs/bench/*/bench.csv`` (relative to the working directory);
3. else, when a GPU is usable, ``run`` first runs ``python -m mobalab.kernels.bench --quick --out
   runs/bench/quick-<UTC time>`` and reads its CSV;
4. else it raises FileNotFoundError saying how to produce one.

So: ``python -m mobalab.kernels.bench --out runs/bench && mobalab run kernel-speed``, or
``MOBALAB_BENCH_CSV=/path/bench.csv mobalab run kernel-speed``.
"""

from __future__ import annotations

import datetime as _dt
import glob
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["Config", "run", "plot", "summary", "default_bench_csv", "read_bench_csv", "REQUIRED_COLUMNS",
           "ENV_VAR"]

NAME = "kernel-speed"
ENV_VAR = "MOBALAB_BENCH_CSV"
#: Columns of ``mobalab.kernels.bench``'s CSV this experiment needs (the one place they are listed here).
REQUIRED_COLUMNS = ("workload", "seqlen", "head_dim", "block", "top_k", "mobalab_ms", "fa2_ms", "cudnn_ms",
                    "useful_tflops", "fa2_tflops", "cudnn_tflops", "mobalab_peak_gb", "fa2_peak_gb",
                    "cudnn_peak_gb")
#: Used when present: identification and mobalab's breakdown.
OPTIONAL_COLUMNS = ("variant", "routing", "batch", "heads", "causal", "dtype", "routing_ms", "attention_ms",
                    "routing_share", "attention_tflops", "routing_tflops")
METHODS = {"mobalab": "mobalab MoBA forward", "fa2": "FlashAttention-2 (SDPA)", "cudnn": "cuDNN attention (SDPA)"}
_BACKENDS = {"mobalab": "cuda-kernel", "fa2": "torch SDPA FLASH_ATTENTION", "cudnn": "torch SDPA CUDNN_ATTENTION"}
_HOW = ("produce one on a GPU with `python -m mobalab.kernels.bench --out runs/bench` (add --quick for a "
        "smoke run), then run `mobalab run kernel-speed` from the same folder, or point the environment "
        f"variable {ENV_VAR} at a bench.csv")


def default_bench_csv() -> str | None:
    """``$MOBALAB_BENCH_CSV`` if set, else the newest ``runs/bench/*.csv`` / ``runs/bench/*/bench.csv``, else
    (in a checkout: here or up to two folders up) the newest recorded
    ``benchmarks/results/*moba-forward*.csv`` (file names start with the date)."""
    env = os.environ.get(ENV_VAR)
    if env:
        return env
    found = glob.glob(os.path.join("runs", "bench", "*.csv")) + glob.glob(
        os.path.join("runs", "bench", "*", "bench.csv"))
    if found:
        return max(found, key=os.path.getmtime)
    for base in [Path.cwd(), *Path.cwd().parents][:3]:  # a notebook runs from notebooks/, one level down
        recorded = sorted((base / "benchmarks" / "results").glob("*moba-forward*.csv"))
        if recorded:
            return str(recorded[-1])
    return None


@dataclass(frozen=True)
class Config:
    """``bench_csv``: the benchmark CSV (default: module docstring); ``run_bench``: run the quick benchmark
    when there is none and a GPU is usable; ``bench_out``: where that run writes."""

    bench_csv: str | None = field(default_factory=default_bench_csv)
    run_bench: bool = True
    bench_out: str = os.path.join("runs", "bench")
    seed: int = 0  # unused (the CSV is measured data); kept for the common CLI

    @classmethod
    def quick(cls, **overrides) -> Config:
        """Same as the default: reading a CSV is quick, and a benchmark it has to run is the quick one."""
        return cls(**overrides)


def _run_quick_bench(out_root: str) -> Path:
    out = Path(out_root) / ("quick-" + _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%S"))
    cmd = [sys.executable, "-m", "mobalab.kernels.bench", "--quick", "--out", str(out)]
    done = subprocess.run(cmd, check=False)
    csv = out / "bench.csv"
    if done.returncode != 0 or not csv.exists():
        raise RuntimeError(f"the quick benchmark failed (exit {done.returncode}): {' '.join(cmd)}")
    return csv


def _resolve_csv(config: Config) -> Path:
    if config.bench_csv:
        path = Path(config.bench_csv)
        if not path.is_file():
            raise FileNotFoundError(f"kernel-speed: benchmark CSV {str(path)!r} does not exist; {_HOW}")
        return path
    from mobalab.kernels import gpu_available

    if config.run_bench and gpu_available():
        return _run_quick_bench(config.bench_out)
    raise FileNotFoundError(f"kernel-speed: no benchmark CSV (none given, ${ENV_VAR} unset, nothing under "
                            f"runs/bench/) and no GPU to run the benchmark on; {_HOW}")


def read_bench_csv(path) -> tuple[pd.DataFrame, str]:
    """The benchmark CSV, checked for :data:`REQUIRED_COLUMNS`, and the device named in bench_env.json."""
    path = Path(path)
    raw = pd.read_csv(path)
    missing = [c for c in REQUIRED_COLUMNS if c not in raw.columns]
    if missing:
        raise ValueError(f"kernel-speed: {path} lacks the columns {missing}; it has {list(raw.columns)} "
                         "(is it a `python -m mobalab.kernels.bench` CSV?)")
    if raw.empty:
        raise ValueError(f"kernel-speed: {path} holds no rows")
    # the benchmark writes bench_env.json beside bench.csv; recorded results keep it as <stem>.json
    env = path.with_name("bench_env.json")
    if not env.is_file():
        env = path.with_suffix(".json")
    device = "unknown device"
    if env.is_file():
        try:
            info = json.loads(env.read_text())
            device = str(info.get("device", device)) + (f", {info['date']}" if info.get("date") else "")
        except (OSError, ValueError):
            pass
    return raw, device


def run(config: Config = Config(), progress: bool = False) -> pd.DataFrame:
    """Tidy rows: one per (benchmark configuration, method in mobalab / fa2 / cudnn)."""
    path = _resolve_csv(config)
    raw, device = read_bench_csv(path)
    for c in OPTIONAL_COLUMNS:
        if c not in raw.columns:
            raw[c] = np.nan
    raw["variant"] = raw["variant"].fillna("default")
    ident = ["workload", "seqlen", "head_dim", "block", "top_k", "variant", "batch", "heads", "causal", "dtype",
             "routing"]
    rows = []
    for method in METHODS:
        tflops = raw["useful_tflops"] if method == "mobalab" else raw[f"{method}_tflops"]
        part = raw[ident].copy()
        part["method"] = method
        part["backend"] = _BACKENDS[method]
        part["latency_ms"] = pd.to_numeric(raw[f"{method}_ms"], errors="coerce")
        part["tflops"] = pd.to_numeric(tflops, errors="coerce")
        part["peak_gb"] = pd.to_numeric(raw[f"{method}_peak_gb"], errors="coerce")
        part["speedup_vs_fa2"] = pd.to_numeric(raw["fa2_ms"], errors="coerce") / part["latency_ms"]
        part["speedup_vs_cudnn"] = pd.to_numeric(raw["cudnn_ms"], errors="coerce") / part["latency_ms"]
        for c in ("routing_ms", "attention_ms", "routing_share", "attention_tflops", "routing_tflops"):
            part[c] = raw[c] if method == "mobalab" else np.nan
        rows.append(part)
    df = pd.concat(rows, ignore_index=True)
    df.insert(0, "device", device)
    df.insert(0, "source", str(path))
    df.insert(0, "experiment", NAME)
    return df


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """One line per benchmark configuration: ms of each method, speedups, useful TFLOP/s, peak GB."""
    keys = ["workload", "seqlen", "head_dim", "block", "variant"]
    mob = df[df["method"] == "mobalab"].set_index(keys)
    out = pd.DataFrame(index=mob.index)
    for m in METHODS:
        out[f"{m}_ms"] = df[df["method"] == m].set_index(keys)["latency_ms"]
    out["x_fa2"] = mob["speedup_vs_fa2"]
    out["x_cudnn"] = mob["speedup_vs_cudnn"]
    out["useful_tflops"] = mob["tflops"]
    out["peak_gb"] = mob["peak_gb"]
    out["fa2_peak_gb"] = df[df["method"] == "fa2"].set_index(keys)["peak_gb"]
    return out.reset_index()


def _series(df: pd.DataFrame) -> list[tuple[tuple, pd.DataFrame]]:
    """mobalab rows grouped into seqlen sweeps: (workload, head_dim, block, top_k, variant) with >= 2 lengths."""
    mob = df[df["method"] == "mobalab"]
    keys = ["workload", "head_dim", "block", "top_k", "variant"]
    out = [(k, g.sort_values("seqlen")) for k, g in mob.groupby(keys, sort=True) if g["seqlen"].nunique() >= 2]
    return sorted(out, key=lambda kg: -len(kg[1]))


def _tokens(x, _pos=None) -> str:
    for unit, div in (("M", 1 << 20), ("K", 1 << 10)):
        if x >= div:
            return f"{x / div:g}{unit}"
    return f"{x:g}"


def plot(df: pd.DataFrame):
    """Six panels: latency, speedup, TFLOP/s, peak memory and routing share over N; latency over B."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    fig, axes = plt.subplots(2, 3, figsize=(16, 9.2), layout="constrained")
    (a_lat, a_sp, a_tf), (a_mem, a_share, a_blk) = axes
    series = _series(df)
    colors = plt.cm.tab10(np.arange(10))
    dense_done = set()
    for i, (key, g) in enumerate(series):
        workload, d, b, k, variant = key
        col = colors[i % 10]
        label = f"{workload}, d={d}, B={b}, k={k}" + ("" if variant in ("auto", "default") else f", {variant}")
        a_lat.plot(g["seqlen"], g["latency_ms"], "o-", color=col, label=f"mobalab: {label}")
        a_sp.plot(g["seqlen"], g["speedup_vs_fa2"], "o-", color=col, label=f"vs FA2: {label}")
        a_sp.plot(g["seqlen"], g["speedup_vs_cudnn"], "s--", color=col, mfc="none", label=f"vs cuDNN: {label}")
        a_tf.plot(g["seqlen"], g["tflops"], "o-", color=col, label=f"mobalab useful: {label}")
        if g["attention_tflops"].notna().any():
            a_tf.plot(g["seqlen"], g["attention_tflops"], "^:", color=col, ms=4,
                      label=f"mobalab attention only: {label}")
        a_mem.plot(g["seqlen"], g["peak_gb"], "o-", color=col, label=f"mobalab: {label}")
        if g["routing_share"].notna().any():
            a_share.plot(g["seqlen"], 100 * g["routing_share"], "o-", color=col, label=label)
        if (d, workload) in dense_done:
            continue
        dense_done.add((d, workload))
        for m, style, gray in (("fa2", "x--", "0.25"), ("cudnn", "+:", "0.55")):
            dd = df[(df["method"] == m) & (df["head_dim"] == d) & (df["workload"] == workload)]
            dd = dd.groupby("seqlen")[["latency_ms", "tflops", "peak_gb"]].first().dropna(how="all")
            if dd.empty:
                continue
            name = f"{METHODS[m]}, d={d}" + ("" if workload == "random" else f", {workload}")
            a_lat.plot(dd.index, dd["latency_ms"], style, color=gray, label=name)
            a_tf.plot(dd.index, dd["tflops"], style, color=gray, label=name + " (dense causal)")
            mem = dd["peak_gb"].dropna()
            a_mem.plot(mem.index, mem.values, style, color=gray, label=name)
    a_sp.axhline(1.0, color="0.4", lw=1)
    # latency against block size at the length with the most block sizes
    mob = df[df["method"] == "mobalab"]
    counts = mob.groupby(["workload", "head_dim", "seqlen", "variant"])["block"].nunique()
    if len(counts) and counts.max() >= 2:
        (w, d, n, variant), _ = max(counts.items(), key=lambda kv: (kv[1], kv[0][2]))
        g = mob[(mob["workload"] == w) & (mob["head_dim"] == d) & (mob["seqlen"] == n)]
        for j, (var, gv) in enumerate(g.groupby("variant")):
            gv = gv.sort_values("block")
            a_blk.plot(gv["block"], gv["latency_ms"], "o-", color=colors[j % 10], label=f"mobalab ({var})")
        dense = df[(df["method"] != "mobalab") & (df["head_dim"] == d) & (df["seqlen"] == n) & (df["workload"] == w)]
        for m, ls in (("fa2", "--"), ("cudnn", ":")):
            v = dense[dense["method"] == m]["latency_ms"].dropna()
            if len(v):
                a_blk.axhline(v.iloc[0], color="0.3", ls=ls, label=METHODS[m])
        a_blk.set_title(f"latency vs block size at N = {_tokens(n)} ({w}, d={d})")
        a_blk.set_xscale("log", base=2)
        a_blk.set_xticks(sorted(g["block"].unique()))
        a_blk.xaxis.set_major_formatter(FuncFormatter(lambda x, _p: f"{x:g}"))
        a_blk.xaxis.set_minor_locator(NullLocator())
        a_blk.set_yscale("log")
        a_blk.yaxis.set_major_formatter(FuncFormatter(lambda y, _p: f"{y:g}"))
        a_blk.set_xlabel("block size B (tokens)")
        a_blk.set_ylabel("forward latency (ms)")
        a_blk.legend(fontsize=7)
    else:
        a_blk.set_visible(False)
    titles = {a_lat: ("forward latency", "median latency (ms)", True),
              a_sp: ("speedup of mobalab (dense ms / mobalab ms)", "speedup (x)", True),
              a_tf: ("throughput", "TFLOP/s (useful FLOPs / time)", True),
              a_mem: ("peak memory (inputs + call's allocation)", "peak memory (GB)", True),
              a_share: ("routing share of mobalab's forward", "routing time (% of forward)", False)}
    seqlens = sorted(df["seqlen"].unique())
    for ax, (title, ylabel, logy) in titles.items():
        ax.set_title(title)
        ax.set_xscale("log", base=2)
        ax.set_xticks(seqlens)
        ax.xaxis.set_major_formatter(FuncFormatter(_tokens))
        ax.xaxis.set_minor_locator(NullLocator())
        if logy:
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0), numticks=12))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _p: f"{y:g}"))
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda y, _p: ""))
        ax.set_xlabel("context N (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
        if ax.has_data():
            ax.legend(fontsize=7)
    a_blk.grid(alpha=0.3, which="both")
    first = df.iloc[0]
    batch = first["batch"] if pd.notna(first["batch"]) else "?"
    heads = first["heads"] if pd.notna(first["heads"]) else "?"
    fig.suptitle(f"MoBA forward vs dense attention on {first['device']} (batch {batch}, {heads} heads, "
                 f"causal, {first['dtype'] if isinstance(first['dtype'], str) else 'bf16'})", fontsize=12)
    return fig

