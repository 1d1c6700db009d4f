r"""design: which block sizes reach a target routing accuracy at (d, N, k), and what they cost.

For each candidate block size B the table holds the paper's SNR = Δμ_eff·sqrt(d / 2B) with
Δμ_eff = Δμ + (m - 1)(μ_cluster - μ_noise) (cosine units), the predicted hit probability (the causal
MoBA average over query and needle positions, or the exact non-causal top-k probability;
:func:`mobalab.snr.design_table`), whether it meets the target, the smallest top-k that would
(:func:`mobalab.snr.smallest_top_k`), and, when a kernel benchmark CSV is given, the measured forward
time of the mobalab kernel at that (B, N, d): the median of the ``ms`` column over rows with
``impl == "mobalab"`` and matching ``block_size``, ``seq_len``, ``head_dim`` (and ``top_k`` when the CSV
has that column).
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from mobalab import snr

__all__ = ["DEFAULT_BLOCK_SIZES", "design", "kernel_cost", "format_design"]

DEFAULT_BLOCK_SIZES = (16, 32, 64, 128, 256, 512)
MAX_TOP_K = 1024  # the search for the smallest top-k stops here (FlashMoBA itself allows <= 64)


def kernel_cost(bench: pd.DataFrame, block_size: int, seq_len: int, head_dim: int, top_k: int | None = None):
    """(median ms, matching rows) of the mobalab kernel at (B, N, d) in a benchmark table; (NaN, 0) if none.

    Reads the long format (impl, block_size, seq_len, head_dim, ms) and the CSV that
    ``mobalab bench`` / ``python -m mobalab.kernels.bench`` writes (seqlen, block, head_dim, mobalab_ms; one
    row per configuration, its own batch and head count: 2 x 16 in the recorded runs).
    """
    if {"seqlen", "block", "mobalab_ms"} <= set(bench.columns):
        bench = bench.rename(columns={"seqlen": "seq_len", "block": "block_size", "mobalab_ms": "ms"})
        bench = bench.assign(impl="mobalab")
    need = {"impl", "block_size", "seq_len", "head_dim", "ms"}
    missing = need - set(bench.columns)
    if missing:
        raise ValueError(f"benchmark CSV lacks column(s) {sorted(missing)}; it has {list(bench.columns)}")
    sel = bench[(bench["impl"] == "mobalab") & (bench["block_size"] == block_size) & (bench["seq_len"] == seq_len)
                & (bench["head_dim"] == head_dim)]
    if top_k is not None and "top_k" in bench.columns:
        sel = sel[sel["top_k"] == top_k]
    ms = pd.to_numeric(sel["ms"], errors="coerce").dropna()
    return (float(ms.median()) if len(ms) else math.nan), int(len(ms))


def design(head_dim: int, seq_len: int, top_k: int, target: float, delta_mu: float = 0.3, m: float = 1,
           mu_cluster: float | None = None, mu_noise: float = 0.0, causal: bool = True,
           block_sizes=DEFAULT_BLOCK_SIZES, bench_csv=None) -> pd.DataFrame:
    """Design table over ``block_sizes`` (one row each, largest B first).

    ``mu_cluster`` defaults to ``mu_noise + delta_mu`` (clustered keys as similar to the query as the
    needle, ρ = 1). Columns: those of :func:`mobalab.snr.design_table` (block_size, n_blocks, snr,
    paper_threshold, hit_probability, meets_target, head_dim, seq_len, top_k, delta_mu_eff, causal,
    target), plus delta_mu, m, mu_cluster, mu_noise, smallest_top_k (<= 64, NA when none reaches the
    target), kernel_ms and bench_rows (NaN / 0 without benchmark data).
    """
    if mu_cluster is None:
        mu_cluster = mu_noise + delta_mu
    dmu_eff = float(snr.delta_mu_eff(delta_mu, m, mu_cluster, mu_noise))
    if not block_sizes:
        raise ValueError("block_sizes must name at least one block size")
    df = snr.design_table(head_dim, seq_len, top_k, dmu_eff, tuple(sorted(set(block_sizes), reverse=True)),
                          causal=causal, target=target)
    df["delta_mu"] = float(delta_mu)
    df["m"] = m
    df["mu_cluster"] = float(mu_cluster)
    df["mu_noise"] = float(mu_noise)
    df["smallest_top_k"] = pd.array(
        [snr.smallest_top_k(target, head_dim, seq_len, int(b), dmu_eff, causal=causal, max_top_k=MAX_TOP_K)
         for b in df["block_size"]], dtype="Int64")
    bench = None
    if bench_csv is not None:
        path = Path(bench_csv)
        if not path.is_file():
            raise ValueError(f"benchmark CSV {str(path)!r} does not exist")
        bench = pd.read_csv(path)
    costs = [kernel_cost(bench, int(b), seq_len, head_dim, top_k) if bench is not None else (math.nan, 0)
             for b in df["block_size"]]
    df["kernel_ms"] = [c[0] for c in costs]
    df["bench_rows"] = [c[1] for c in costs]
    df.attrs["bench_csv"] = None if bench_csv is None else str(bench_csv)
    return df


def format_design(df: pd.DataFrame) -> str:
    """Human-readable report of a :func:`design` table: inputs, the table, the verdict, the cost."""
    r = df.iloc[0]
    mode = "causal (own block forced, average over query and needle positions)" if r["causal"] else "non-causal top-k"
    lines = [
        f"MoBA design: d = {r['head_dim']}, N = {r['seq_len']}, top-k = {r['top_k']}, target P(hit) >= {r['target']:g}",
        f"signal: Δμ = {r['delta_mu']:g}, m = {r['m']:g}, μ_cluster = {r['mu_cluster']:g}, μ_noise = {r['mu_noise']:g}"
        f"  ->  Δμ_eff = {r['delta_mu_eff']:g} (cosine units); model: {mode}",
        "",
    ]
    has_cost = bool((df["bench_rows"] > 0).any())
    table = pd.DataFrame({
        "B": df["block_size"],
        "n blocks": df["n_blocks"],
        "SNR": df["snr"].map(lambda x: f"{x:.3f}"),
        "paper rule Φ⁻¹(1-k/n)": df["paper_threshold"].map(lambda x: f"{x:.3f}"),
        "P(hit)": df["hit_probability"].map(lambda x: f"{x:.4f}"),
        "feasible": df["meets_target"].map(lambda x: "yes" if x else "no"),
        f"min top-k (<= {MAX_TOP_K})": df["smallest_top_k"].map(lambda x: "-" if pd.isna(x) else str(int(x))),
    })
    if has_cost:
        table["kernel ms"] = df["kernel_ms"].map(lambda x: "-" if math.isnan(x) else f"{x:.3f}")
    lines.append(table.to_string(index=False))
    lines.append("")
    ok = df[df["meets_target"].astype(bool)]
    if ok.empty:
        best = df.loc[df["hit_probability"].idxmax()]
        lines.append(f"no block size reaches P(hit) >= {r['target']:g}; best is B = {best['block_size']} "
                     f"with P(hit) = {best['hit_probability']:.4f}")
    else:
        lines.append(f"feasible block sizes: {', '.join(str(b) for b in sorted(ok['block_size'], reverse=True))}; "
                     f"largest: B = {int(ok['block_size'].max())}")
    if df.attrs.get("bench_csv") is None:
        lines.append("kernel cost: no benchmark data (pass --bench-csv PATH)")
    elif not has_cost:
        lines.append(f"kernel cost: no benchmark data for d = {r['head_dim']}, N = {r['seq_len']} in "
                     f"{df.attrs['bench_csv']}")
    else:
        feas = ok[ok["bench_rows"] > 0]
        if not feas.empty:
            cheapest = feas.loc[feas["kernel_ms"].idxmin()]
            lines.append(f"kernel cost: cheapest feasible B = {cheapest['block_size']} at "
                         f"{cheapest['kernel_ms']:.3f} ms (median of {cheapest['bench_rows']} benchmark rows)")
        else:
            lines.append("kernel cost: no benchmark data for the feasible block sizes")
    return "\n".join(lines)
