r"""decode-cost: inference cost next to routing accuracy: which (B, k) is cheapest to decode at a target P(hit).

For every context N, block size B and top-k k, at the decode position t = N - 1 (the newest token):

* accuracy: the causal MoBA hit probability of a needle uniform on [0, t] (own block always attended,
  k - 1 slots among the complete past blocks), :func:`mobalab.snr.causal_hit_probability` at
  SNR = Δμ_eff·sqrt(d / 2B), Δμ_eff = Δμ + (m - 1)(μ_cluster - μ_noise) (:func:`mobalab.snr.snr`);
* cost: HBM bytes of one decode step from the byte model :func:`mobalab.kernels.decode_bytes` (fp32 block
  sums of the past blocks, or their 16-bit means for ``centroid_precision="input"``, K and V of the union of
  the blocks the query heads of a kv head select, q and out) and, when a decode benchmark CSV is given
  (``python -m mobalab.bench.decode``), the measured step time at the same (N, B, k) and routing precision;
* the cheapest (B, k) that meets the target, by bytes (``cheapest``) and by measured time
  (``cheapest_measured``).

Small B sharpens routing (SNR grows as 1/sqrt(B)) but costs more block sums (N / B of them, each d fp32),
large B makes every selected block dearer; k trades slots for bytes. CPU only; the benchmark CSV is read,
never run: set ``Config.bench_csv`` (``mobalab run decode-cost --bench-csv CSV``) or the environment variable
``MOBALAB_DECODE_BENCH_CSV`` to a path, ``recorded`` (the newest decode benchmark recorded on an H200,
:data:`RECORDED_BENCH`) or a recorded CSV's name (:func:`find_bench_csv`). Nothing is drawn at random:
``run_seed`` is the run's seed, carried so that every experiment's CSV has it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from mobalab import snr
from mobalab._validate import default_mu_cluster, scalar_count
from mobalab.kernels import decode_bytes, decode_flops

from ._checks import check_seed
from ._columns import check_table

__all__ = ["Config", "run", "plot", "summary", "plan", "decode_cost_table", "find_bench_csv", "read_decode_bench",
           "ENV_VAR", "RECORDED_BENCH"]

NAME = "decode-cost"
#: columns of the tidy table that plot and summary read (check_table names the missing ones)
_TABLE_COLUMNS = ("seq_len", "block_size", "top_k", "target", "hit_probability", "meets_target", "bytes_per_step",
                  "byte_ratio", "dense_bytes", "cheapest", "cheapest_measured")
_PLOT_COLUMNS = _SUMMARY_COLUMNS = _TABLE_COLUMNS
ENV_VAR = "MOBALAB_DECODE_BENCH_CSV"
K = 1024
#: Columns of the decode benchmark CSV this experiment reads (``mobalab.bench.decode``).
BENCH_COLUMNS = ("seq_len", "block_size", "top_k", "mobalab_ms", "dense_best_ms")
#: The recorded decode benchmark that ``recorded`` stands for: the newest one. Named here because the file
#: names (date, device, commit) cannot order the benchmarks recorded on one day.
RECORDED_BENCH = "2026-12-03-h200-decode-36727b2.csv"
_HOW = ("produce one on a GPU with `mobalab bench --decode --out DIR` (DIR/decode.csv), or pass `recorded` for "
        "the recorded H200 decode benchmark")


def _bench_from_env() -> str | None:
    return os.environ.get(ENV_VAR) or None


@dataclass(frozen=True)
class Config:
    """Model shape (``head_dim``, ``heads`` / ``kv_heads``, ``batch``, ``q_len``), the grid (``seq_lens`` x
    ``block_sizes`` x ``top_ks``), the accuracy ``target`` and the signal: needle cosine ``delta_mu`` above
    noise ``mu_noise``, plus ``m - 1`` keys of cosine ``mu_cluster`` (default ``mu_noise + delta_mu``) in its
    block. ``overlap``: how the byte model counts the query heads' blocks ("independent" as on random data,
    "shared" when the heads of a kv head agree). ``centroid_precision``: the decode router's centroids ("fp32" sums,
    or "input": the block means rounded to the cache's dtype, which the kernel reads at ``itemsize`` bytes)."""

    head_dim: int = 128
    heads: int = 32
    kv_heads: int = 8
    batch: int = 8
    q_len: int = 1
    seq_lens: tuple[int, ...] = (32 * K, 128 * K, 512 * K, 1024 * K)
    block_sizes: tuple[int, ...] = (16, 32, 64, 128, 256, 512)
    top_ks: tuple[int, ...] = (2, 4, 8, 16, 32)
    target: float = 0.9
    delta_mu: float = 0.5
    m: float = 6
    mu_cluster: float | None = None
    mu_noise: float = 0.0
    overlap: str = "independent"
    itemsize: int = 2
    centroid_precision: str = "fp32"
    bench_csv: str | None = field(default_factory=_bench_from_env)
    seed: int = 0  # nothing is sampled; written as ``run_seed`` like every experiment's seed

    @classmethod
    def quick(cls, **overrides) -> Config:
        """Three contexts, four block sizes, three top-k: well under a second."""
        base = dict(seq_lens=(32 * K, 128 * K, 512 * K), block_sizes=(32, 64, 128, 256), top_ks=(4, 8, 16))
        base.update(overrides)
        return cls(**base)


def find_bench_csv(value) -> Path:
    """The decode benchmark CSV ``value`` names: a path, ``"recorded"`` (:data:`RECORDED_BENCH`, the newest
    decode benchmark recorded on an H200) or the name of a recorded CSV (:func:`mobalab.bench.find_csv`).

    Raises
    ------
    FileNotFoundError
        When ``value`` is neither an existing file nor a recorded one; the message lists the recorded decode
        benchmarks and says how to measure one.

    Examples
    --------
    >>> from mobalab.experiments.decode_cost import find_bench_csv
    >>> find_bench_csv("recorded").name
    '2026-12-03-h200-decode-36727b2.csv'
    >>> find_bench_csv("2026-12-01-h200-decode-7e51062").parent.name
    'recorded'
    """
    from mobalab.bench import find_csv, recorded_file

    return find_csv(value, lambda: recorded_file(RECORDED_BENCH), f"{NAME}: decode benchmark CSV", _HOW,
                    pattern="*-decode-*.csv")


def read_decode_bench(path) -> pd.DataFrame:
    """The decode benchmark CSV ``path`` names (:func:`find_bench_csv`), checked for :data:`BENCH_COLUMNS`."""
    path = find_bench_csv(path)
    bench = pd.read_csv(path)
    missing = [c for c in BENCH_COLUMNS if c not in bench.columns]
    if missing:
        raise ValueError(f"{NAME}: {path} lacks the columns {missing}; it has {list(bench.columns)} "
                         "(is it a `mobalab bench --decode` CSV?)")
    return bench


def _measured(bench: pd.DataFrame | None, seq_len, block_size, top_k, shape: dict,
              centroid_precision: str = "fp32") -> tuple[float, float]:
    """(median mobalab ms, median dense ms) of the benchmark rows at this point and routing precision (a CSV
    without the column holds fp32 rows); NaN when there are none.

    A benchmark that timed both decode kernels (column ``kernel``) counts the rows of the kernel ``moba_decode``
    runs by default (``auto``, or ``$MOBALAB_DECODE_KERNEL``), not a median over both."""
    if bench is None:
        return math.nan, math.nan
    sel = bench[(bench["seq_len"] == seq_len) & (bench["block_size"] == block_size) & (bench["top_k"] == top_k)]
    for col, value in shape.items():  # rows of another model shape do not count
        if col in sel.columns:
            sel = sel[sel[col] == value]
    if "centroid_precision" in sel.columns:
        sel = sel[sel["centroid_precision"] == centroid_precision]
    elif centroid_precision != "fp32":
        sel = sel.iloc[:0]
    if "kernel" in sel.columns and sel["kernel"].nunique() > 1:
        from mobalab.kernels._cuda_decode_split import decode_kernel

        sel = sel[sel["kernel"] == decode_kernel()]
    ms = pd.to_numeric(sel["mobalab_ms"], errors="coerce").dropna()
    dense = pd.to_numeric(sel["dense_best_ms"], errors="coerce").dropna()
    return (float(ms.median()) if len(ms) else math.nan), (float(dense.median()) if len(dense) else math.nan)


def decode_cost_table(seq_len: int, target: float, *, head_dim: int = 128, heads: int = 32, kv_heads: int = 8,
                      batch: int = 8, q_len: int = 1, block_sizes=(16, 32, 64, 128, 256, 512), top_ks=(2, 4, 8, 16, 32),
                      delta_mu: float = 0.5, m: float = 6, mu_cluster: float | None = None, mu_noise: float = 0.0,
                      overlap: str = "independent", itemsize: int = 2, bench: pd.DataFrame | None = None,
                      centroid_precision: str = "fp32") -> pd.DataFrame:
    """Accuracy and decode cost of every (B, k) at context ``seq_len``, one row each (module docstring).

    Columns: seq_len, block_size, top_k, n_blocks, snr, hit_probability, target, meets_target, the byte model
    (centroid_bytes, kv_bytes, q_out_bytes, bytes_per_step, dense_bytes, byte_ratio, unique_blocks),
    useful_flops, measured_ms / dense_ms / measured_speedup (NaN without ``bench``), cheapest and
    cheapest_measured (the feasible row with the fewest bytes / the shortest measured time), and the inputs.

    Examples
    --------
    >>> from mobalab.experiments.decode_cost import decode_cost_table
    >>> t = decode_cost_table(512 * 1024, 0.9, block_sizes=(32, 128), top_ks=(4, 8))
    >>> best = t[t["cheapest"]].iloc[0]
    >>> int(best["block_size"]), int(best["top_k"]), round(float(best["hit_probability"]), 3)
    (32, 4, 0.991)
    """
    if not 0.0 < target < 1.0:
        raise ValueError(f"target must be a probability in (0, 1), got {target!r}")
    for name, values in (("block_sizes", block_sizes), ("top_ks", top_ks)):
        if len(values) == 0:
            raise ValueError(f"{name} must name at least one value, got {tuple(values)!r}")
    head_dim = scalar_count("head_dim", head_dim)  # checked here: snr.snr would call it d
    if mu_cluster is None:
        mu_cluster = default_mu_cluster(delta_mu, mu_noise)
    dmu_eff = float(snr.delta_mu_eff(delta_mu, m, mu_cluster, mu_noise))
    shape = dict(batch=batch, heads=heads, kv_heads=kv_heads, head_dim=head_dim)
    rows = []
    for block in block_sizes:
        s = float(snr.snr(head_dim, block, dmu_eff))
        for top_k in top_ks:
            p = float(snr.causal_hit_probability(s, seq_len, block, top_k, query_pos=seq_len - 1))
            cost = decode_bytes(seq_len, block, top_k, batch=batch, heads=heads, kv_heads=kv_heads,
                                head_dim=head_dim, q_len=q_len, itemsize=itemsize, overlap=overlap,
                                centroid_precision=centroid_precision)
            flops = decode_flops(seq_len, block, top_k, batch=batch, heads=heads, kv_heads=kv_heads,
                                 head_dim=head_dim, q_len=q_len)
            ms, dense_ms = _measured(bench, seq_len, block, top_k, shape, centroid_precision)
            rows.append(dict(seq_len=seq_len, block_size=block, top_k=top_k, n_blocks=math.ceil(seq_len / block),
                             snr=s, hit_probability=p, target=float(target), meets_target=p >= target,
                             centroid_bytes=cost["centroid_bytes"], kv_bytes=cost["kv_bytes"],
                             q_out_bytes=cost["q_out_bytes"], bytes_per_step=cost["total_bytes"],
                             dense_bytes=cost["dense_bytes"], byte_ratio=cost["byte_ratio"],
                             unique_blocks=cost["unique_blocks"], useful_flops=float(flops["total_flops"]),
                             measured_ms=ms, dense_ms=dense_ms, measured_speedup=dense_ms / ms))
    df = pd.DataFrame(rows)
    feasible = df[df["meets_target"]]
    df["cheapest"] = False
    df["cheapest_measured"] = False
    if not feasible.empty:
        df.loc[feasible["bytes_per_step"].idxmin(), "cheapest"] = True
        timed = feasible["measured_ms"].dropna()
        if not timed.empty:
            df.loc[timed.idxmin(), "cheapest_measured"] = True
    for key, value in dict(shape, q_len=q_len, delta_mu_eff=dmu_eff, delta_mu=float(delta_mu), m=m,
                           mu_cluster=float(mu_cluster), mu_noise=float(mu_noise), overlap=overlap,
                           centroid_precision=centroid_precision).items():
        df[key] = value
    return df


def plan(config: Config = Config()) -> str:
    """What :func:`run` will do, said before it starts (the CLI prints it); reads the benchmark CSV, so that a
    wrong one is refused before any work.

    Examples
    --------
    >>> from mobalab.experiments.decode_cost import Config, plan
    >>> print(plan(Config.quick(bench_csv=None)))  # doctest: +ELLIPSIS
    byte model on the CPU: 3 contexts x 4 block sizes x 3 top-k = 36 points; no decode benchmark CSV (bytes ...
    >>> print(plan(Config.quick(bench_csv="recorded")))  # doctest: +ELLIPSIS
    byte model on the CPU: ... = 36 points; step times from the recorded decode benchmark 2026-12-03-h200-...
    """
    points = len(config.seq_lens) * len(config.block_sizes) * len(config.top_ks)
    text = (f"byte model on the CPU: {len(config.seq_lens)} contexts x {len(config.block_sizes)} block sizes x "
            f"{len(config.top_ks)} top-k = {points} points; ")
    if not config.bench_csv:
        return text + ("no decode benchmark CSV (bytes only; --bench-csv recorded adds the step times recorded on "
                       "an H200)")
    path = find_bench_csv(config.bench_csv)
    read_decode_bench(path)
    from mobalab.bench import recorded_dir

    if path.resolve().parent == recorded_dir().resolve():
        return text + f"step times from the recorded decode benchmark {path.name}"
    return text + f"step times from {path}"


def run(config: Config = Config(), progress: bool = False) -> pd.DataFrame:
    """The cost table at every context of the config (one row per (N, B, k)); ``run_seed`` is the config's
    seed (nothing here is random)."""
    check_seed(config.seed)
    if len(config.seq_lens) == 0:
        raise ValueError(f"seq_lens must name at least one context, got {tuple(config.seq_lens)!r}")
    path = find_bench_csv(config.bench_csv) if config.bench_csv else None
    bench = read_decode_bench(path) if path is not None else None
    parts = []
    for n in tqdm(config.seq_lens, desc=NAME, disable=not progress):
        parts.append(decode_cost_table(n, config.target, head_dim=config.head_dim, heads=config.heads,
                                       kv_heads=config.kv_heads, batch=config.batch, q_len=config.q_len,
                                       block_sizes=config.block_sizes, top_ks=config.top_ks,
                                       delta_mu=config.delta_mu, m=config.m, mu_cluster=config.mu_cluster,
                                       mu_noise=config.mu_noise, overlap=config.overlap, itemsize=config.itemsize,
                                       bench=bench, centroid_precision=config.centroid_precision))
    df = pd.concat(parts, ignore_index=True)
    df.insert(0, "experiment", NAME)
    df.insert(1, "run_seed", config.seed)
    df["bench_csv"] = str(path) if path is not None else ""
    return df


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per context: the cheapest feasible (B, k) by bytes (and by measured time when there is any), its
    P(hit), MB per step and bytes saved against dense decode."""
    check_table(df, NAME, "summary", _TABLE_COLUMNS)
    out = []
    for n, g in df.groupby("seq_len", sort=True):
        line = dict(seq_len=int(n), target=float(g["target"].iloc[0]), feasible=int(g["meets_target"].sum()),
                    of=len(g))
        best = g[g["cheapest"]]
        if best.empty:
            top = g.loc[g["hit_probability"].idxmax()]
            line.update(block_size=np.nan, top_k=np.nan, hit_probability=float(top["hit_probability"]),
                        mb_per_step=np.nan, x_fewer_bytes=np.nan)
        else:
            r = best.iloc[0]
            line.update(block_size=int(r["block_size"]), top_k=int(r["top_k"]),
                        hit_probability=float(r["hit_probability"]), mb_per_step=r["bytes_per_step"] / 1e6,
                        x_fewer_bytes=float(r["byte_ratio"]))
        timed = g[g["cheapest_measured"]]
        if not timed.empty:
            r = timed.iloc[0]
            line.update(measured_block_size=int(r["block_size"]), measured_top_k=int(r["top_k"]),
                        measured_ms=float(r["measured_ms"]), measured_speedup=float(r["measured_speedup"]))
        out.append(line)
    return pd.DataFrame(out)


def _tokens(n) -> str:
    n = int(n)
    return f"{n // (1024 * K)}M" if n % (1024 * K) == 0 else f"{n // K}K" if n % K == 0 else str(n)


def plot(df: pd.DataFrame):
    """One panel per context: P(hit) against MB per step for every (B, k), the target and the cheapest
    feasible point; a last panel: the cheapest feasible bytes (and measured time) against the context."""
    check_table(df, NAME, "plot", _TABLE_COLUMNS)
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    seq_lens = sorted(df["seq_len"].unique())
    fig, axes = plt.subplots(1, len(seq_lens) + 1, figsize=(4.6 * (len(seq_lens) + 1), 4.4), layout="constrained")
    blocks = sorted(df["block_size"].unique())
    ks = sorted(df["top_k"].unique())
    colors = dict(zip(blocks, plt.cm.viridis(np.linspace(0.05, 0.9, len(blocks))), strict=True))
    markers = dict(zip(ks, "os^Dvp*hX"[:len(ks)], strict=False))
    target = float(df["target"].iloc[0])
    for ax, n in zip(axes, seq_lens, strict=False):
        g = df[df["seq_len"] == n]
        for (block, top_k), r in g.groupby(["block_size", "top_k"]):
            ax.scatter(r["bytes_per_step"] / 1e6, r["hit_probability"], color=colors[block],
                       marker=markers.get(top_k, "o"), s=40, zorder=3)
        best = g[g["cheapest"]]
        if not best.empty:
            ax.scatter(best["bytes_per_step"] / 1e6, best["hit_probability"], s=260, facecolors="none",
                       edgecolors="red", linewidths=2, zorder=4,
                       label=f"cheapest: B={int(best['block_size'].iloc[0])}, k={int(best['top_k'].iloc[0])}")
        ax.axhline(target, color="0.3", ls="--", lw=1, label=f"target P(hit) = {target:g}")
        dense = float(g["dense_bytes"].iloc[0]) / 1e6
        ax.set_xscale("log")
        ax.set_title(f"N = {_tokens(n)} (dense decode: {dense:,.0f} MB/step)", fontsize=10)
        ax.set_xlabel("HBM bytes per decode step (MB, byte model)")
        ax.set_ylabel("P(hit) at the newest token")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="lower right")
    legend = [Line2D([], [], ls="none", marker="o", color=colors[b], label=f"B = {b}") for b in blocks]
    legend += [Line2D([], [], ls="none", marker=markers.get(k, "o"), color="0.4", label=f"k = {k}") for k in ks]
    axes[0].legend(handles=legend + axes[0].get_legend_handles_labels()[0], fontsize=7, loc="lower right", ncol=2)

    ax = axes[-1]
    best = df[df["cheapest"]].sort_values("seq_len")
    per_n = df.groupby("seq_len")["dense_bytes"].first()
    ax.plot(per_n.index, per_n.values / 1e6, "x--", color="0.3", label="dense decode (whole cache)")
    if not best.empty:
        ax.plot(best["seq_len"], best["bytes_per_step"] / 1e6, "o-", color="tab:red",
                label="cheapest feasible MoBA (byte model)")
        for _, r in best.iterrows():
            ax.annotate(f"B={int(r['block_size'])}, k={int(r['top_k'])}", (r["seq_len"], r["bytes_per_step"] / 1e6),
                        textcoords="offset points", xytext=(4, -12), fontsize=7)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(seq_lens)
    ax.set_xticklabels([_tokens(n) for n in seq_lens])
    ax.minorticks_off()
    ax.set_xlabel("context N (tokens)")
    ax.set_ylabel("MB per decode step")
    ax.set_title(f"cheapest (B, k) with P(hit) >= {target:g}", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    timed = df[df["cheapest_measured"]].sort_values("seq_len")
    if not timed.empty:
        ax2 = ax.twinx()
        ax2.plot(timed["seq_len"], timed["measured_ms"], "s:", color="tab:blue", label="cheapest measured (ms)")
        ax2.set_ylabel("measured decode step (ms)")
        ax2.legend(fontsize=7, loc="lower right")
    ax.legend(fontsize=7, loc="upper left")
    first = df.iloc[0]
    fig.suptitle(f"decode cost vs routing accuracy: d = {first['head_dim']}, {first['heads']} / {first['kv_heads']} "
                 f"heads, batch {first['batch']}, Δμ_eff = {first['delta_mu_eff']:g}, heads' blocks "
                 f"{first['overlap']}", fontsize=11)
    return fig
