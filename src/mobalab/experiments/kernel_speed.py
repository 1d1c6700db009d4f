r"""kernel-speed: latency, speedup, useful TFLOP/s and peak memory of the MoBA kernels, from a benchmark CSV.

Reads a CSV that ``mobalab bench --out DIR`` writes on a GPU: ``bench.csv`` (forward: one row per
configuration with mobalab's forward, FlashAttention-2 (torch SDPA FLASH_ATTENTION) and cuDNN
(CUDNN_ATTENTION) side by side) or ``bench_bwd.csv`` (``--backward``: forward + backward of the three);
``bench_env.json`` beside it (a recorded CSV: the JSON of the same stem) names the device, date and commit.
It turns that into a tidy table (one row per configuration and method; ``pass`` says forward or
forward+backward) and a figure: latency and speedup over the context length, useful TFLOP/s (routing +
attention on the selected tokens for mobalab, the dense causal count for FA2 / cuDNN), peak memory, the
routing share of the forward (or the backward share of forward+backward), and latency against the block
size.

Which CSV (``Config.bench_csv``, ``mobalab run kernel-speed --bench-csv PATH``; :func:`find_bench_csv`
also takes ``recorded`` or the name of a recorded CSV):

1. ``Config.bench_csv`` when given; by default the environment variable ``MOBALAB_BENCH_CSV``, else the
   newest ``runs/bench/*.csv`` or ``runs/bench/*/bench*.csv`` under the working directory;
2. else, when ``run_bench`` and a GPU is usable, ``run`` first runs the quick benchmark in-process
   (``mobalab bench --quick --out runs/bench/quick-<UTC time>``) and reads its CSV;
3. else the newest forward CSV recorded on an H200 and shipped with mobalab
   (:func:`mobalab.bench.recorded_files`). Recorded numbers say so: ``recorded`` is True in every row and
   :func:`caption` names the device, date and commit.
"""

from __future__ import annotations

import datetime as _dt
import glob
import importlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ._checks import check_seed
from ._columns import check_table

__all__ = ["Config", "run", "plot", "summary", "plan", "caption", "default_bench_csv", "find_bench_csv",
           "read_bench_csv", "REQUIRED_COLUMNS", "BACKWARD_COLUMNS", "ENV_VAR"]

NAME = "kernel-speed"

#: columns of the tidy table that plot and summary read (check_table names the missing ones)
_PLOT_COLUMNS = ("attention_tflops", "batch", "block", "commit", "date", "device", "dtype", "head_dim", "heads",
                 "latency_ms", "method", "pass", "peak_gb", "recorded", "routing_share", "seqlen", "speedup_vs_cudnn",
                 "speedup_vs_fa2", "tflops", "top_k", "variant", "workload")
_SUMMARY_COLUMNS = ("block", "head_dim", "latency_ms", "method", "peak_gb", "seqlen", "speedup_vs_cudnn",
                    "speedup_vs_fa2", "tflops", "top_k", "variant", "workload")
ENV_VAR = "MOBALAB_BENCH_CSV"
#: Columns of the forward benchmark CSV (``bench.csv``) this experiment needs.
REQUIRED_COLUMNS = ("workload", "seqlen", "head_dim", "block", "top_k", "mobalab_ms", "fa2_ms", "cudnn_ms",
                    "useful_tflops", "fa2_tflops", "cudnn_tflops", "mobalab_peak_gb", "fa2_peak_gb",
                    "cudnn_peak_gb")
#: Columns of the forward + backward benchmark CSV (``bench_bwd.csv``) this experiment needs.
BACKWARD_COLUMNS = ("workload", "seqlen", "head_dim", "block", "top_k", "fwd_ms", "fwdbwd_ms", "fa2_fwdbwd_ms",
                    "cudnn_fwdbwd_ms", "fwdbwd_useful_tflops", "fwdbwd_peak_gb", "fa2_fwdbwd_peak_gb",
                    "cudnn_fwdbwd_peak_gb", "batch", "heads")
#: Used when present: identification and mobalab's breakdown.
OPTIONAL_COLUMNS = ("variant", "routing", "batch", "heads", "causal", "dtype", "routing_ms", "attention_ms",
                    "routing_share", "attention_tflops", "routing_tflops", "bwd_ms", "fwdbwd_det_ms")
METHODS = {"mobalab": "mobalab MoBA", "fa2": "FlashAttention-2 (SDPA)", "cudnn": "cuDNN attention (SDPA)"}
PASSES = ("forward", "forward+backward")
_BACKENDS = {"mobalab": "cuda-kernel", "fa2": "torch SDPA FLASH_ATTENTION", "cudnn": "torch SDPA CUDNN_ATTENTION"}
_HOW = ("measure on a GPU with `mobalab bench --out runs/bench` (add --quick for a smoke run, --backward for "
        f"forward + backward) and pass its bench.csv with --bench-csv (or ${ENV_VAR}); `--bench-csv recorded` "
        "reads the recorded H200 forward CSV")


def default_bench_csv() -> str | None:
    """The benchmark CSV named outside the call: ``$MOBALAB_BENCH_CSV`` if set, else the newest
    ``runs/bench/*.csv`` / ``runs/bench/*/bench*.csv`` under the working directory, else None.

    Examples
    --------
    >>> import os
    >>> from mobalab.experiments import kernel_speed
    >>> saved = os.environ.get(kernel_speed.ENV_VAR)
    >>> os.environ[kernel_speed.ENV_VAR] = "elsewhere/bench.csv"
    >>> kernel_speed.default_bench_csv()
    'elsewhere/bench.csv'
    >>> _ = os.environ.pop(kernel_speed.ENV_VAR) if saved is None else os.environ.update({kernel_speed.ENV_VAR: saved})
    """
    env = os.environ.get(ENV_VAR)
    if env:
        return env
    found = glob.glob(os.path.join("runs", "bench", "*.csv")) + glob.glob(
        os.path.join("runs", "bench", "*", "bench*.csv"))
    if found:
        return max(found, key=os.path.getmtime)
    return None


def _recorded_forward() -> Path:
    from mobalab.bench import recorded_files

    found = recorded_files("*moba-forward*.csv")
    if not found:  # pragma: no cover - the package ships one
        raise FileNotFoundError("no recorded forward benchmark CSV in this installation of mobalab")
    return found[-1]


def find_bench_csv(value) -> Path:
    """The benchmark CSV ``value`` names: a path, ``"recorded"`` (the newest recorded forward CSV) or the
    name of a recorded CSV (:func:`mobalab.bench.recorded_files`).

    Raises
    ------
    FileNotFoundError
        When ``value`` is neither an existing file nor a recorded one; the message says how to get one.

    Examples
    --------
    >>> from mobalab.experiments.kernel_speed import find_bench_csv
    >>> find_bench_csv("recorded").name
    '2026-11-22-h200-moba-forward-43ade7f.csv'
    >>> find_bench_csv("2026-11-22-h200-moba-fwdbwd-e4ca8e1.csv").parent.name
    'recorded'
    """
    from mobalab.bench import find_csv

    return find_csv(value, _recorded_forward, f"{NAME}: benchmark CSV", _HOW)


@dataclass(frozen=True)
class Config:
    """``bench_csv``: the benchmark CSV (:func:`find_bench_csv`; default :func:`default_bench_csv`);
    ``run_bench``: with no CSV and a usable GPU, run the quick benchmark first (else read the recorded
    CSV); ``bench_out``: where that run writes."""

    bench_csv: str | None = field(default_factory=default_bench_csv)
    run_bench: bool = True
    bench_out: str = os.path.join("runs", "bench")
    seed: int = 0  # nothing is drawn (the CSV is measured data); written as ``run_seed`` like every experiment's

    @classmethod
    def quick(cls, **overrides) -> Config:
        """Same as the default: reading a CSV is quick, and a benchmark it has to run is the quick one."""
        return cls(**overrides)


def _will_measure(config: Config) -> bool:
    if config.bench_csv or not config.run_bench:
        return False
    from mobalab.kernels import gpu_available

    return gpu_available()


def plan(config: Config = Config()) -> str:
    """What :func:`run` will read, said before it starts (the CLI prints it).

    Examples
    --------
    >>> from mobalab.experiments import kernel_speed
    >>> print(kernel_speed.plan(kernel_speed.Config(bench_csv="recorded")))  # doctest: +ELLIPSIS
    reads the recorded benchmark 2026-11-22-h200-moba-forward-43ade7f.csv (NVIDIA H200, ...); nothing runs here
    """
    if _will_measure(config):
        return (f"no benchmark CSV given: runs the quick benchmark on this GPU first (a few minutes), writing "
                f"{config.bench_out}/quick-<UTC time>/")
    path = find_bench_csv(config.bench_csv) if config.bench_csv else _recorded_forward()
    info = _bench_info(path)
    what = "the recorded benchmark" if info["recorded"] else "the benchmark CSV"
    shown = path.name if info["recorded"] else str(path)
    return f"reads {what} {shown} ({_provenance(info)}); nothing runs here"


def _run_quick_bench(out_root: str) -> Path:
    """Run ``mobalab bench --quick`` in this process (no subprocess); the path of the CSV it wrote."""
    out = Path(out_root) / ("quick-" + _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%S"))
    attention = importlib.import_module("mobalab.bench.attention")
    rc = attention.main(["--quick", "--out", str(out)])
    csv = out / "bench.csv"
    if rc not in (0, None) or not csv.is_file():
        raise RuntimeError(f"the quick benchmark failed (exit {rc}, {'no ' if not csv.is_file() else ''}{csv})")
    return csv


def _resolve_csv(config: Config) -> Path:
    if config.bench_csv:
        return find_bench_csv(config.bench_csv)
    if _will_measure(config):
        return _run_quick_bench(config.bench_out)
    return _recorded_forward()


def _bench_info(path: Path) -> dict:
    """Provenance of a benchmark CSV: device, date, commit (from the JSON beside it) and whether it is recorded."""
    from mobalab.bench import recorded_dir

    path = Path(path)
    info = {"source": str(path), "device": "unknown device", "date": None, "commit": None,
            "recorded": path.resolve().parent == recorded_dir().resolve()}
    for env in (path.with_name("bench_env.json"), path.with_suffix(".json")):
        if env.is_file():
            try:
                raw = json.loads(env.read_text())
            except (OSError, ValueError):
                continue
            info["device"] = str(raw.get("device") or raw.get("cuda_device") or info["device"])
            info["date"] = raw.get("date") or raw.get("utc")
            info["commit"] = raw.get("git_commit") or raw.get("commit")
            break
    else:
        # a recorded CSV without its JSON still names its date, device and commit: 2026-11-30-h200-peers-ce1fd61.csv
        named = re.fullmatch(r"(\d{4}-\d{2}-\d{2})-([a-z0-9]+)-.+-([0-9a-f]{7,40})", path.stem)
        if info["recorded"] and named:
            info.update(date=named.group(1), device=f"NVIDIA {named.group(2).upper()} (from the file name)",
                        commit=named.group(3))
    return info


def _provenance(info: dict) -> str:
    parts = [info["device"], info.get("date") or "date unknown",
             f"commit {info['commit']}" if info.get("commit") else "commit unknown"]
    return ", ".join(parts)


def read_bench_csv(path, check: bool = True) -> tuple[pd.DataFrame, dict]:
    """A benchmark CSV, checked, and what is known about it.

    Parameters
    ----------
    path : str or pathlib.Path
        ``bench.csv`` (forward) or ``bench_bwd.csv`` (forward + backward) from ``mobalab bench``.
    check : bool
        Require the columns this experiment needs (:data:`REQUIRED_COLUMNS` or :data:`BACKWARD_COLUMNS`);
        False reads any such CSV (``mobalab design`` needs only the mobalab kernel's times).

    Returns
    -------
    (pandas.DataFrame, dict)
        The raw rows, and ``pass`` ("forward" or "forward+backward"), ``device``, ``date``, ``commit`` (from
        ``bench_env.json`` beside it, or the JSON of the same stem), ``recorded`` (shipped with mobalab) and
        ``source`` (the path).

    Raises
    ------
    ValueError
        When the CSV has neither format's columns, or no rows.

    Examples
    --------
    >>> from mobalab.experiments.kernel_speed import find_bench_csv, read_bench_csv
    >>> raw, info = read_bench_csv(find_bench_csv("2026-11-22-h200-moba-fwdbwd-e4ca8e1.csv"))
    >>> info["pass"], info["device"], info["commit"], info["recorded"], len(raw)
    ('forward+backward', 'NVIDIA H200', 'e4ca8e1', True, 2)
    """
    path = Path(path)
    raw = pd.read_csv(path)
    if check and "timed" in raw.columns:  # the peers (--peers) and head-dim (--dims) benchmarks' CSVs
        raise ValueError(f"kernel-speed: {path} holds rows timed per pass ({', '.join(map(str, raw['timed'].unique()))}"
                         "): a `mobalab bench --peers` or `--dims` CSV, which this experiment does not draw; pass "
                         "a bench.csv (forward) or bench_bwd.csv (forward + backward) of `mobalab bench`")
    if "fwdbwd_ms" in raw.columns:
        kind, need = "forward+backward", BACKWARD_COLUMNS
    else:
        kind, need = "forward", REQUIRED_COLUMNS
    missing = [c for c in need if c not in raw.columns] if check else []
    if missing:
        raise ValueError(f"kernel-speed: {path} lacks the columns {missing} of a {kind} benchmark CSV; it has "
                         f"{list(raw.columns)} (is it a `mobalab bench` bench.csv or bench_bwd.csv?)")
    if raw.empty:
        raise ValueError(f"kernel-speed: {path} holds no rows")
    return raw, dict(_bench_info(path), **{"pass": kind})


def _dense_fwdbwd_flops(raw: pd.DataFrame) -> pd.Series:
    # the benchmark's convention: dense causal forward 4·b·h·N²·d/2, backward 2.5x the forward
    b, h, n, d = (pd.to_numeric(raw[c], errors="coerce") for c in ("batch", "heads", "seqlen", "head_dim"))
    return 3.5 * 2.0 * b * h * n * n * d


def run(config: Config = Config(), progress: bool = False) -> pd.DataFrame:
    """Tidy rows: one per (benchmark configuration, method in mobalab / fa2 / cudnn).

    Columns: experiment, run_seed (the config's seed: nothing is drawn from it, the rows are measured data, but
    every experiment's CSV carries its run's seed), source, recorded, device, date, commit, pass, the
    configuration (workload, seqlen, head_dim, block, top_k, variant, batch, heads, causal, dtype, routing),
    method, backend, latency_ms, tflops, peak_gb, speedup_vs_fa2, speedup_vs_cudnn, and mobalab's breakdown:
    routing_ms, attention_ms, routing_share, attention_tflops, routing_tflops (forward); fwd_ms, bwd_ms,
    backward_share, deterministic_ms (forward+backward). Missing numbers stay NaN.

    Examples
    --------
    >>> from mobalab.experiments import kernel_speed
    >>> df = kernel_speed.run(kernel_speed.Config(bench_csv="recorded"))
    >>> bool(df["recorded"].all()), sorted(set(df["method"])), df["pass"].iloc[0]
    (True, ['cudnn', 'fa2', 'mobalab'], 'forward')
    """
    check_seed(config.seed)
    path = _resolve_csv(config)
    raw, info = read_bench_csv(path)
    raw = raw.copy()
    for c in OPTIONAL_COLUMNS:
        if c not in raw.columns:
            raw[c] = np.nan
    raw["variant"] = raw["variant"].astype(object).where(raw["variant"].notna(), "default")
    forward = info["pass"] == "forward"
    if forward:
        cols = {m: (f"{m}_ms", "useful_tflops" if m == "mobalab" else f"{m}_tflops", f"{m}_peak_gb")
                for m in METHODS}
    else:
        cols = {"mobalab": ("fwdbwd_ms", "fwdbwd_useful_tflops", "fwdbwd_peak_gb")}
        for m in ("fa2", "cudnn"):
            raw[f"{m}_fwdbwd_tflops"] = _dense_fwdbwd_flops(raw) / (pd.to_numeric(raw[f"{m}_fwdbwd_ms"],
                                                                                  errors="coerce") * 1e9)
            cols[m] = (f"{m}_fwdbwd_ms", f"{m}_fwdbwd_tflops", f"{m}_fwdbwd_peak_gb")
    ident = ["workload", "seqlen", "head_dim", "block", "top_k", "variant", "batch", "heads", "causal", "dtype",
             "routing"]
    rows = []
    fa2_ms = pd.to_numeric(raw[cols["fa2"][0]], errors="coerce")
    cudnn_ms = pd.to_numeric(raw[cols["cudnn"][0]], errors="coerce")
    for method, (ms, tflops, peak) in cols.items():
        part = raw[ident].copy()
        part["method"] = method
        part["backend"] = _BACKENDS[method]
        part["latency_ms"] = pd.to_numeric(raw[ms], errors="coerce")
        part["tflops"] = pd.to_numeric(raw[tflops], errors="coerce")
        part["peak_gb"] = pd.to_numeric(raw[peak], errors="coerce")
        part["speedup_vs_fa2"] = fa2_ms / part["latency_ms"]
        part["speedup_vs_cudnn"] = cudnn_ms / part["latency_ms"]
        mine = method == "mobalab"
        for c in ("routing_ms", "attention_ms", "routing_share", "attention_tflops", "routing_tflops"):
            part[c] = pd.to_numeric(raw[c], errors="coerce") if mine else np.nan
        if not forward:
            part["fwd_ms"] = pd.to_numeric(raw["fwd_ms"], errors="coerce") if mine else np.nan
            part["bwd_ms"] = pd.to_numeric(raw["bwd_ms"], errors="coerce") if mine else np.nan
            part["backward_share"] = part["bwd_ms"] / part["latency_ms"]
            part["deterministic_ms"] = pd.to_numeric(raw["fwdbwd_det_ms"], errors="coerce") if mine else np.nan
        rows.append(part)
    df = pd.concat(rows, ignore_index=True)
    df.insert(0, "pass", info["pass"])
    for i, key in enumerate(("source", "recorded", "device", "date", "commit")):
        df.insert(i, key, info[key])
    df.insert(0, "run_seed", config.seed)
    df.insert(0, "experiment", NAME)
    return df


def caption(df: pd.DataFrame) -> str:
    """One line that says where the numbers come from; the CLI prints it above the summary table.

    Examples
    --------
    >>> from mobalab.experiments import kernel_speed
    >>> print(kernel_speed.caption(kernel_speed.run(kernel_speed.Config(bench_csv="recorded"))))
    ... # doctest: +ELLIPSIS
    RECORDED forward benchmark, not measured on this machine: NVIDIA H200, 2026-11-22 00:02 UTC, commit 43ade7f (...)
    """
    r = df.iloc[0]
    info = {"device": r["device"], "date": r["date"] if pd.notna(r["date"]) else None,
            "commit": r["commit"] if pd.notna(r["commit"]) else None}
    if bool(r["recorded"]):
        return (f"RECORDED {r['pass']} benchmark, not measured on this machine: {_provenance(info)} "
                f"({Path(r['source']).name}, shipped with mobalab)")
    return f"{r['pass']} benchmark: {_provenance(info)} ({r['source']})"


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """One line per benchmark configuration: ms of each method, speedups, useful TFLOP/s, peak GB."""
    check_table(df, NAME, "summary", _SUMMARY_COLUMNS)
    # top_k too: a benchmark that varies it at one (N, d, B) would otherwise print look-alike lines
    keys = ["workload", "seqlen", "head_dim", "block", "top_k", "variant"]
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
    """Six panels: latency, speedup, TFLOP/s, peak memory and the routing share of the forward (or the
    backward share of forward+backward) over N; latency over B. The title names the pass, the device and,
    for recorded numbers, that they are recorded (date, commit).

    Examples
    --------
    >>> from mobalab.experiments import kernel_speed
    >>> fig = kernel_speed.plot(kernel_speed.run(kernel_speed.Config(bench_csv="recorded")))
    >>> len([ax for ax in fig.axes if ax.get_visible()]), fig._suptitle.get_text().splitlines()[0]
    (6, 'MoBA forward vs dense attention on NVIDIA H200 (recorded 2026-11-22 00:02 UTC, commit 43ade7f)')
    >>> import matplotlib.pyplot as plt
    >>> plt.close(fig)
    """
    check_table(df, NAME, "plot", _PLOT_COLUMNS)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    fig, axes = plt.subplots(2, 3, figsize=(16, 9.2), layout="constrained")
    (a_lat, a_sp, a_tf), (a_mem, a_share, a_blk) = axes
    series = _series(df)
    first = df.iloc[0]
    fwd = first["pass"] == "forward"
    share = "routing_share" if fwd else "backward_share"
    what = "forward" if fwd else "forward+backward"
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
        if g[share].notna().any():
            a_share.plot(g["seqlen"], 100 * g[share], "o-", color=col, label=label)
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
        a_blk.set_ylabel(f"{what} latency (ms)")
        a_blk.legend(fontsize=7)
    else:
        a_blk.set_visible(False)
    titles = {a_lat: (f"{what} latency", "median latency (ms)", True),
              a_sp: ("speedup of mobalab (dense ms / mobalab ms)", "speedup (x)", True),
              a_tf: ("throughput", "TFLOP/s (useful FLOPs / time)", True),
              a_mem: ("peak memory (inputs + call's allocation)", "peak memory (GB)", True),
              a_share: (("routing share of mobalab's forward", "routing time (% of forward)", False) if fwd
                        else ("backward share of mobalab's forward+backward", "backward time (% of total)", False))}
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
    batch = int(first["batch"]) if pd.notna(first["batch"]) else "?"
    heads = int(first["heads"]) if pd.notna(first["heads"]) else "?"
    where = first["device"]
    if bool(first["recorded"]):
        where = f"{where} (recorded {first['date'] or ''}, commit {first['commit'] or 'unknown'})"
    fig.suptitle(f"MoBA {what} vs dense attention on {where}\n(batch {batch}, {heads} heads, "
                 f"causal, {first['dtype'] if isinstance(first['dtype'], str) else 'bf16'})", fontsize=12)
    return fig

