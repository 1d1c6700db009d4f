r"""The logic of ``mobalab design``: which block sizes reach a target routing accuracy at (d, N, k), and
what the kernel costs there.

For each candidate block size B the table holds the paper's SNR = Δμ_eff·sqrt(d / 2B) with
Δμ_eff = Δμ + (m - 1)(μ_cluster - μ_noise) (cosine units), the predicted hit probability (the causal
MoBA average over query and needle positions, or the exact non-causal top-k probability;
:func:`mobalab.snr.design_table`), whether it meets the target, the smallest top-k that would
(:func:`mobalab.snr.smallest_top_k`), and, given a ``mobalab bench`` CSV, the measured time of the mobalab
kernel at that (N, d, B, k) (:func:`kernel_cost`). See docs/design.md, "Inverse design".
"""

from __future__ import annotations

import math
import numbers

import pandas as pd

from mobalab import snr
from mobalab._validate import default_mu_cluster

__all__ = ["DEFAULT_BLOCK_SIZES", "design", "kernel_cost", "automatic_variant", "format_design",
           "decode_cost", "format_decode_cost"]

DEFAULT_BLOCK_SIZES = (16, 32, 64, 128, 256, 512)
MAX_TOP_K = 1024  # the search for the smallest top-k stops here (FlashMoBA itself allows <= 64)


def automatic_variant(head_dim: int, block_size: int) -> str:
    """The forward tile kernel ``moba_attention`` picks on its own: ``"resident"`` when the K and V of one
    block and two query tiles (16-bit) fit in the resident kernel's shared memory, else ``"streaming"``
    (docs/design.md, "Forward").

    Examples
    --------
    >>> from mobalab._design_command import automatic_variant
    >>> automatic_variant(128, 128), automatic_variant(128, 256), automatic_variant(64, 256)
    ('resident', 'streaming', 'resident')
    """
    from mobalab.kernels._cuda_attention import resident

    return "resident" if resident(head_dim, block_size, "auto") else "streaming"


def kernel_cost(bench: pd.DataFrame, block_size: int, seq_len: int, head_dim: int, top_k: int | None = None
                ) -> dict:
    """Measured time of the mobalab kernel at (B, N, d[, k]) in a ``mobalab bench`` CSV's rows.

    Reads the forward CSV (``bench.csv``: ``seqlen``, ``head_dim``, ``block``, ``top_k``, ``workload``,
    ``variant``, ``mobalab_ms``) and the forward + backward CSV (``bench_bwd.csv``: ``fwdbwd_ms``). Among
    the matching rows it takes the ``random`` workload when measured (the published benchmark's data) and,
    in a forward CSV, the tile kernel the automatic choice runs (:func:`automatic_variant`) when that was
    measured, else the one that was. It never mixes kernels or workloads: the median is over repetitions of
    one configuration.

    Returns
    -------
    dict
        ``ms`` (NaN when nothing matches), ``kernel`` ("resident", "streaming" or "forward+backward"; None
        when nothing matches), ``workload`` and ``rows`` (how many rows the median is over).

    Examples
    --------
    >>> import pandas as pd
    >>> from mobalab._design_command import kernel_cost
    >>> rows = pd.DataFrame({"workload": ["random", "random", "clustered"], "seqlen": [65536] * 3,
    ...                      "head_dim": [128] * 3, "block": [128] * 3, "top_k": [8] * 3,
    ...                      "variant": ["resident", "streaming", "resident"], "mobalab_ms": [13.6, 15.7, 13.4]})
    >>> kernel_cost(rows, 128, 65536, 128, top_k=8)
    {'ms': 13.6, 'kernel': 'resident', 'workload': 'random', 'rows': 1}
    """
    backward = "fwdbwd_ms" in bench.columns
    need = {"seqlen", "head_dim", "block", "fwdbwd_ms" if backward else "mobalab_ms"}
    missing = need - set(bench.columns)
    if missing:
        raise ValueError(f"benchmark CSV lacks column(s) {sorted(missing)} of a `mobalab bench` CSV; it has "
                         f"{list(bench.columns)}")
    sel = bench[(bench["block"] == block_size) & (bench["seqlen"] == seq_len) & (bench["head_dim"] == head_dim)]
    if top_k is not None and "top_k" in bench.columns:
        sel = sel[sel["top_k"] == top_k]
    none = {"ms": math.nan, "kernel": None, "workload": None, "rows": 0}
    if sel.empty:
        return none
    workload = None
    if "workload" in sel.columns:
        workload = "random" if (sel["workload"] == "random").any() else str(sel["workload"].iloc[0])
        sel = sel[sel["workload"] == workload]
    if backward:
        kernel, col = "forward+backward", "fwdbwd_ms"
    else:
        col = "mobalab_ms"
        kernel = automatic_variant(head_dim, block_size)
        if "variant" in sel.columns:
            measured = list(dict.fromkeys(sel["variant"].astype(str)))
            kernel = kernel if kernel in measured else measured[0]
            sel = sel[sel["variant"].astype(str) == kernel]
    ms = pd.to_numeric(sel[col], errors="coerce").dropna()
    if ms.empty:
        return none
    return {"ms": float(ms.median()), "kernel": kernel, "workload": workload, "rows": int(len(ms))}


def design(head_dim: int, seq_len: int, top_k: int, target: float, delta_mu: float = 0.3, m: int = 1,
           mu_cluster: float | None = None, mu_noise: float = 0.0, causal: bool = True,
           block_sizes=DEFAULT_BLOCK_SIZES, bench_csv=None) -> pd.DataFrame:
    """Design table over ``block_sizes`` (one row each, largest B first).

    Parameters
    ----------
    head_dim, seq_len, top_k : int
        d, the context N in tokens and the blocks selected per query (the own block included).
    target : float
        Target P(hit) in (0, 1).
    delta_mu, m, mu_cluster, mu_noise : float, int, float, float
        The signal: needle cosine minus noise cosine, keys of the needle's block with elevated cosine (the
        needle included), their cosine (default ``mu_noise + delta_mu``: as similar as the needle) and the
        noise keys' cosine.
    causal : bool
        Causal MoBA (own block forced, averaged over positions) or plain top-k.
    block_sizes : sequence of int
        Candidate block sizes.
    bench_csv : str or path, optional
        A ``mobalab bench`` CSV, ``"recorded"`` or a recorded CSV's name
        (:func:`mobalab.experiments.kernel_speed.find_bench_csv`), for the kernel cost.

    Returns
    -------
    pandas.DataFrame
        The columns of :func:`mobalab.snr.design_table` plus delta_mu, m, mu_cluster, mu_noise,
        smallest_top_k (<= ``MAX_TOP_K``, NA when none reaches the target), kernel_ms, kernel, workload and
        bench_rows (NaN / None / 0 without benchmark data); ``attrs["bench"]`` describes the CSV.

    Examples
    --------
    >>> from mobalab._design_command import design
    >>> df = design(64, 8192, 8, 0.8, delta_mu=0.5, m=4, causal=False, block_sizes=(32, 128))
    >>> df[["block_size", "snr", "hit_probability", "meets_target"]].round(3).values.tolist()
    [[128, 1.0, 0.593, False], [32, 2.0, 0.824, True]]
    """
    if mu_cluster is None:
        mu_cluster = default_mu_cluster(delta_mu, mu_noise)
    dmu_eff = float(snr.delta_mu_eff(delta_mu, m, mu_cluster, mu_noise))
    sizes = tuple(block_sizes) if hasattr(block_sizes, "__len__") else (block_sizes,)  # numpy arrays too
    if len(sizes) == 0:
        raise ValueError(f"block_sizes must name at least one block size, got {block_sizes!r}")
    df = snr.design_table(head_dim, seq_len, top_k, dmu_eff, tuple(sorted(set(sizes), reverse=True)),
                          causal=causal, target=target)
    df["delta_mu"] = float(delta_mu)
    df["m"] = m
    df["mu_cluster"] = float(mu_cluster)
    df["mu_noise"] = float(mu_noise)
    df["smallest_top_k"] = pd.array(
        [snr.smallest_top_k(target, head_dim, seq_len, int(b), dmu_eff, causal=causal, max_top_k=MAX_TOP_K)
         for b in df["block_size"]], dtype="Int64")
    costs = [{"ms": math.nan, "kernel": None, "workload": None, "rows": 0}] * len(df)
    df.attrs["bench"] = None
    if bench_csv is not None:
        from mobalab.experiments.kernel_speed import find_bench_csv, read_bench_csv

        try:
            raw, info = read_bench_csv(find_bench_csv(bench_csv), check=False)
        except FileNotFoundError as exc:
            raise ValueError(str(exc)) from None
        try:
            costs = [kernel_cost(raw, int(b), seq_len, head_dim, top_k) for b in df["block_size"]]
        except ValueError as exc:  # a CSV of another kind: say which file
            raise ValueError(f"{info['source']}: {exc}") from None
        df.attrs["bench"] = info
    df["kernel_ms"] = [c["ms"] for c in costs]
    df["kernel"] = [c["kernel"] for c in costs]
    df["workload"] = [c["workload"] for c in costs]
    df["bench_rows"] = [c["rows"] for c in costs]
    return df


def format_design(df: pd.DataFrame) -> str:
    """Human-readable report of a :func:`design` table: inputs, the table, the verdict, the cost.

    Examples
    --------
    >>> from mobalab._design_command import design, format_design
    >>> text = format_design(design(64, 8192, 8, 0.8, delta_mu=0.5, m=4, block_sizes=(32, 128)))
    >>> text.splitlines()[-2]
    'feasible block sizes: 32; largest: B = 32'
    """
    r = df.iloc[0]
    mode = "causal (own block forced, average over query and needle positions)" if r["causal"] else "non-causal top-k"
    lines = [
        f"MoBA design: d = {r['head_dim']}, N = {r['seq_len']}, top-k = {r['top_k']}, target P(hit) >= {r['target']:g}",
        f"signal: Δμ = {r['delta_mu']:g}, m = {r['m']:g}, μ_cluster = {r['mu_cluster']:g}, μ_noise = {r['mu_noise']:g}"
        f"  ->  Δμ_eff = {r['delta_mu_eff']:g} (cosine units); model: {mode}",
        "",
    ]
    info = df.attrs.get("bench")
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
        table["kernel ms"] = [("-" if math.isnan(ms) else f"{ms:.3f}") for ms in df["kernel_ms"]]
        table["kernel"] = ["-" if pd.isna(k) else k for k in df["kernel"]]
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
    if info is None:
        lines.append("kernel cost: no benchmark data (pass --bench-csv PATH, or --bench-csv recorded)")
        return "\n".join(lines)
    from pathlib import Path

    where = (f"{'RECORDED ' if info['recorded'] else ''}{info['pass']} benchmark {Path(info['source']).name} "
             f"({info['device']}, {info.get('date') or 'date unknown'}, commit {info.get('commit') or 'unknown'})")
    if not has_cost:
        lines.append(f"kernel cost: no rows for d = {r['head_dim']}, N = {r['seq_len']}, top-k = {r['top_k']} "
                     f"in {where}")
        return "\n".join(lines)
    lines.append(f"kernel cost from the {where}; kernel: the forward tile kernel the automatic choice runs "
                 "(resident when a block's K and V fit in 64 KiB) where measured"
                 if info["pass"] == "forward" else f"kernel cost from the {where}: forward + backward")
    feas = ok[ok["bench_rows"] > 0]
    if not feas.empty:
        cheapest = feas.loc[feas["kernel_ms"].idxmin()]
        workload = cheapest["workload"] if pd.notna(cheapest["workload"]) else "unnamed"
        lines.append(f"cheapest feasible: B = {cheapest['block_size']} at {cheapest['kernel_ms']:.3f} ms "
                     f"({cheapest['kernel']} kernel, {workload} workload)")
    else:
        lines.append("kernel cost: no benchmark data for the feasible block sizes")
    return "\n".join(lines)


def decode_cost(df: pd.DataFrame, context: int, batch: int = 8, heads: int = 32, kv_heads: int = 8,
                bench_csv=None, centroid_precision: str = "fp32") -> pd.DataFrame | None:
    """Cost of one decode step at ``context`` tokens for the design's recommended (B, k): the largest feasible
    block size of ``df`` (a :func:`design` table) and its top-k; None when no block size is feasible.

    One row of :func:`mobalab.experiments.decode_cost.decode_cost_table` (HBM bytes of a step from the byte
    model: fp32 block sums, or the 16-bit block means for ``centroid_precision="input"``, + K/V of the own block
    and of the union of the selected past blocks + q/out, against dense decode's whole cache, for ``batch``
    sequences of ``heads`` query heads over ``kv_heads`` kv heads; P(hit) of the newest token and whether it
    meets the design's target; ``measured_ms`` from a decode benchmark CSV's rows of that shape and precision
    when given). ``bench_csv``: a path, ``"recorded"`` or a recorded CSV's name, as ``mobalab run decode-cost
    --bench-csv`` takes it (:func:`mobalab.experiments.decode_cost.find_bench_csv`); ``attrs["bench_csv"]``
    names the file read (None without one).

    Examples
    --------
    >>> from mobalab._design_command import design, decode_cost
    >>> df = design(128, 32768, 8, 0.5, delta_mu=0.5, m=4, block_sizes=(64, 128))
    >>> c = decode_cost(df, 512 * 1024).iloc[0]
    >>> mb, ratio = float(c["bytes_per_step"]) / 1e6, float(c["byte_ratio"])
    >>> int(c["block_size"]), int(c["top_k"]), round(mb, 1), round(ratio, 1)
    (128, 8, 255.7, 67.2)
    """
    from mobalab.experiments.decode_cost import decode_cost_table, find_bench_csv, read_decode_bench

    if isinstance(context, bool) or not isinstance(context, numbers.Integral) or context < 2:
        raise ValueError(f"decode context must be an integer >= 2 tokens, got {context!r}")
    path = find_bench_csv(bench_csv) if bench_csv is not None else None
    bench = read_decode_bench(path) if path is not None else None
    ok = df[df["meets_target"].astype(bool)]
    if ok.empty:
        return None
    r = df.iloc[0]
    block = int(ok["block_size"].max())
    table = decode_cost_table(int(context), float(r["target"]), head_dim=int(r["head_dim"]), heads=heads,
                              kv_heads=kv_heads, batch=batch, block_sizes=(block,), top_ks=(int(r["top_k"]),),
                              delta_mu=float(r["delta_mu"]), m=float(r["m"]), mu_cluster=float(r["mu_cluster"]),
                              mu_noise=float(r["mu_noise"]), bench=bench, centroid_precision=centroid_precision)
    table = table.drop(columns=["cheapest", "cheapest_measured"])
    table.attrs["bench_csv"] = None if path is None else str(path)
    return table


def format_decode_cost(cost: pd.DataFrame | None) -> str:
    """One paragraph for :func:`decode_cost`'s row (or why there is none).

    Examples
    --------
    >>> from mobalab._design_command import design, decode_cost, format_decode_cost
    >>> df = design(128, 32768, 8, 0.5, delta_mu=0.5, m=4, block_sizes=(64, 128))
    >>> print(format_decode_cost(decode_cost(df, 512 * 1024)).splitlines()[0])
    decode cost of B = 128, k = 8 at N = 524288 (batch 8, 32 / 8 heads, d 128, bf16, one token per step):
    """
    if cost is None:
        return "decode cost: no feasible block size to cost"
    c = cost.iloc[0]
    rows = "16-bit block means" if c["centroid_precision"] == "input" else "fp32 block sums"
    verdict = "meets" if c["meets_target"] else "below"
    lines = [f"decode cost of B = {c['block_size']}, k = {c['top_k']} at N = {c['seq_len']} (batch {c['batch']}, "
             f"{c['heads']} / {c['kv_heads']} heads, d {c['head_dim']}, bf16, one token per step):",
             # unique_blocks counts past blocks only; the own block's tokens are in kv_bytes too
             f"  {c['bytes_per_step'] / 1e6:.1f} MB of HBM per step ({c['centroid_bytes'] / 1e6:.1f} MB {rows} + "
             f"{c['kv_bytes'] / 1e6:.1f} MB K/V of the own block and {c['unique_blocks']:.1f} selected past blocks "
             f"per kv head); dense decode reads {c['dense_bytes'] / 1e6:.1f} MB ({c['byte_ratio']:.2f}x MoBA's "
             "bytes)",
             f"  P(hit) of the newest token at N = {c['seq_len']}: {c['hit_probability']:.4f} ({verdict} the target "
             f"{c['target']:g})"]
    source = cost.attrs.get("bench_csv")
    if not math.isnan(c["measured_ms"]):
        lines.append(f"  measured step time: {c['measured_ms']:.3f} ms, dense decode {c['dense_ms']:.3f} ms "
                     f"({c['measured_speedup']:.1f}x)")
    elif source is None:
        lines.append("  measured step time: no decode benchmark row (pass --decode-bench-csv DIR/decode.csv from "
                     "`mobalab bench --decode`, or --decode-bench-csv recorded)")
    else:
        from pathlib import Path

        lines.append(f"  measured step time: no decode benchmark row in {Path(source).name} at this point (N, B, k, "
                     f"batch, heads, kv heads, d, {c['centroid_precision']} centroids)")
    return "\n".join(lines)
