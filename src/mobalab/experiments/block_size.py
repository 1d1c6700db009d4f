r"""block-size: the sqrt(d/B) law, theory against Monte Carlo, and where the Gaussian model bends.

The paper's SNR = Δμ_eff·sqrt(d / 2B) (Δμ in cosine units, per-token variance 1/d) says that halving B
multiplies the SNR by sqrt(2). Four sweeps, each point with:

* ``paper``: P_hit at the paper's SNR with equal signal/noise variances (:func:`mobalab.snr.snr`,
  :func:`mobalab.snr.hit_probability`);
* ``generator``: P_hit at the *exact* block-score moments of the vector generator
  (:func:`mobalab.snr.generator_block_model`: planted tokens have variance (1 - μ²)/d, not 1/d, so the
  signal block is less noisy, SNR_gen = SNR_paper·sqrt(2B / (2B - Σ μ²)) for isotropic planting);
* score-level Monte Carlo of that Gaussian model, and vector-level Monte Carlo (real unit vectors,
  centroids, MoBA top-k), each with a 95% Wilson interval and its distance from the generator prediction
  in interval units (``interval_units``; ``paper_interval_units`` for the paper's prediction).

Sweeps (``sweep`` column):

* ``fixed k/n``: d fixed, B over ``block_sizes`` at context ``seq_len`` with k = (k/n)·n (constant
  sparsity, the paper's grid);
* ``fixed k``: the same B with k fixed;
* ``head dim``: B fixed, d over ``head_dims``, Δμ fixed in cosine units (the paper's first open question);
* ``clt``: the Gaussian (CLT) approximation at tiny blocks: n fixed, B from 32 down to 1, the needle and
  its m - 1 companions sharing one cosine μ <= ``clt_max_mu``, (m, μ) chosen with the fewest companions
  so that the generator SNR is ``clt_snr`` at every B (:func:`.snr_vs_accuracy.vector_point`). The
  block score is a sum of B·d coordinate products; the noise token score q·k of unit vectors has
  excess kurtosis -6/(d+2), so the block score's is -6/((d+2)B): the Gaussian law fails (lighter
  tails than assumed, so the needle is found *more* often than predicted) only when d·B is small.
  ``excess_kurtosis`` holds that number.

Measured SNR: each vector-level estimate is inverted through the generator's P_hit(SNR) curve
(``snr_measured`` with the interval from the Wilson end points), so the sqrt(d/B) law can be read as a
slope on log axes; ``summary`` fits that slope.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from mobalab import simulate, snr
from mobalab.stats import interval_units

from ._checks import check_seed
from ._columns import check_table, integer_columns
from ._devices import resolve_device
from .snr_vs_accuracy import vector_point

__all__ = ["Config", "run", "plot", "summary", "plan", "measured_snr"]

NAME = "block-size"

#: columns of the tidy table that plot and summary read (check_table names the missing ones)
_PLOT_COLUMNS = ("block_size", "ci_high", "ci_low", "delta_mu_eff", "estimate", "head_dim", "interval_units", "m",
                 "method", "mu_signal", "n_blocks", "paper_snr", "sd_ratio", "seq_len", "snr", "snr_measured",
                 "snr_measured_high", "snr_measured_low", "sweep", "top_k")
_SUMMARY_COLUMNS = ("block_size", "head_dim", "interval_units", "method", "paper_interval_units", "paper_prediction",
                    "paper_snr", "prediction", "snr_measured", "sweep", "trials")
SWEEPS = ("fixed k/n", "fixed k", "head dim", "clt")


@dataclass(frozen=True)
class Config:
    """What to sweep. Signal (all sweeps but ``clt``): needle cosine ``mu_signal`` plus ``m - 1`` keys of
    cosine ``mu_cluster`` in its block, so Δμ_eff = mu_signal + (m - 1)·mu_cluster in cosine units."""

    head_dim: int = 64
    block_sizes: tuple[int, ...] = (512, 256, 128, 64, 32, 16)
    seq_len: int = 8192
    sparsity: float = 0.125  # k/n of the "fixed k/n" sweep
    fixed_top_k: int = 8
    head_dims: tuple[int, ...] = (32, 64, 128, 256)
    head_dim_block_size: int = 128
    head_dim_top_k: int = 8
    mu_signal: float = 0.5
    m: int = 4
    mu_cluster: float = 0.5
    clt_block_sizes: tuple[int, ...] = (32, 16, 8, 4, 2, 1)
    clt_head_dims: tuple[int, ...] = (16, 64)
    clt_blocks: int = 256
    clt_top_k: int = 8
    clt_snr: float = 1.5
    clt_max_mu: float = 0.8
    clt_trials: int = 20_000
    score_trials: int = 200_000
    vector_trials: int = 2_000
    planted: str = "isotropic"
    device: str = "auto"  # vector leg: "auto" (CUDA when present), "cpu" or a torch device string
    seed: int = 0

    @classmethod
    def quick(cls, **overrides) -> Config:
        """A CPU run that finishes in well under a minute."""
        base = dict(seq_len=2048, block_sizes=(256, 128, 64, 32, 16), fixed_top_k=4, head_dims=(32, 64, 128),
                    head_dim_top_k=4, vector_trials=300, score_trials=20_000, clt_block_sizes=(16, 4, 1),
                    clt_head_dims=(16,), clt_blocks=128, clt_trials=2_000)
        base.update(overrides)
        return cls(**base)


def plan(config: Config = Config()) -> str:
    """What :func:`run` will do, said before it starts (the CLI prints it): points, trials, device.

    Examples
    --------
    >>> from mobalab.experiments import block_size
    >>> print(block_size.plan(block_size.Config.quick(device="cpu")))
    16 sweep points; score level: numpy, 20000 trials each; vector level on cpu: 300 trials (clt: 2000)
    """
    return (f"{len(_points(config))} sweep points; score level: numpy, {config.score_trials} trials each; "
            f"vector level on {resolve_device(config.device)}: {config.vector_trials} trials "
            f"(clt: {config.clt_trials})")


def measured_snr(p: float, n_blocks: int, top_k: int, sd_ratio: float = 1.0) -> float:
    """SNR at which P_hit(SNR; n, k, sd_ratio) = p; -inf for p = 0 and +inf for p = 1 (and k >= n: NaN)."""
    if top_k >= n_blocks:
        return math.nan
    if p <= 0.0:
        return -math.inf
    if p >= 1.0:
        return math.inf
    return float(snr.required_snr(p, n_blocks, top_k, sd_ratio))


def _points(config: Config):
    """(sweep, head_dim, block_size, seq_len, top_k, mu_signal, m, mu_cluster) for every sweep point."""
    c = config
    pts = []
    for B in c.block_sizes:
        n = -(-c.seq_len // B)
        pts.append(("fixed k/n", c.head_dim, B, c.seq_len, max(1, round(c.sparsity * n)), c.mu_signal, c.m,
                    c.mu_cluster))
    for B in c.block_sizes:
        pts.append(("fixed k", c.head_dim, B, c.seq_len, c.fixed_top_k, c.mu_signal, c.m, c.mu_cluster))
    for d in c.head_dims:
        pts.append(("head dim", d, c.head_dim_block_size, c.seq_len, c.head_dim_top_k, c.mu_signal, c.m,
                    c.mu_cluster))
    for d in c.clt_head_dims:
        for B in c.clt_block_sizes:
            m, mu, _ = vector_point(c.clt_snr, d, B, c.clt_max_mu, c.planted)
            pts.append(("clt", d, B, c.clt_blocks * B, c.clt_top_k, mu, m, mu))
    return pts


def run(config: Config = Config(), progress: bool = False) -> pd.DataFrame:
    """Analytic predictions, score- and vector-level Monte Carlo for every sweep point; one row per leg.

    Examples
    --------
    >>> from mobalab.experiments import block_size
    >>> cfg = block_size.Config(seq_len=512, block_sizes=(64, 32), head_dims=(32,), clt_block_sizes=(4,),
    ...                         clt_head_dims=(16,), clt_blocks=32, clt_trials=50, score_trials=500,
    ...                         vector_trials=30, device="cpu", seed=0)
    >>> block_size.run(cfg).groupby("sweep").size().to_dict()
    {'clt': 4, 'fixed k': 8, 'fixed k/n': 8, 'head dim': 4}
    """
    check_seed(config.seed)
    if config.m > min(config.block_sizes + (config.head_dim_block_size,)):
        raise ValueError(f"m = {config.m} clustered keys do not fit in the smallest block of the sweep")
    if not 0.0 < config.sparsity <= 1.0:
        raise ValueError(f"sparsity (k/n) must lie in (0, 1], got {config.sparsity}")
    device = resolve_device(config.device)
    pts = _points(config)
    seeds = iter(np.random.SeedSequence(config.seed).generate_state(2 * len(pts)))
    rows = []
    for sweep, d, B, N, k, mu_s, m, mu_c in tqdm(pts, desc=NAME, disable=not progress):
        n = -(-N // B)
        gen = snr.generator_block_model(d, B, mu_s, m=m, mu_cluster=mu_c, planted=config.planted)
        dmu = float(snr.delta_mu_eff(mu_s, m, mu_c))
        paper_snr = float(snr.snr(d, B, dmu))
        paper_pred = float(snr.hit_probability(paper_snr, n, k))
        gen_pred = float(snr.hit_probability(gen.snr, n, k, sd_ratio=gen.sd_ratio))
        common = dict(sweep=sweep, head_dim=d, block_size=B, seq_len=N, n_blocks=n, top_k=k, mu_signal=mu_s, m=m,
                      mu_cluster=mu_c, delta_mu_eff=dmu, paper_snr=paper_snr, snr=float(gen.snr),
                      sd_ratio=float(gen.sd_ratio), paper_threshold=float(snr.paper_threshold(n, k)),
                      excess_kurtosis=-6.0 / ((d + 2.0) * B), prediction=gen_pred, paper_prediction=paper_pred)
        rows.append(dict(common, method="paper", backend="numpy", estimate=paper_pred))
        rows.append(dict(common, method="generator", backend="numpy", estimate=gen_pred))
        trials_mc = config.clt_trials if sweep == "clt" else config.vector_trials
        sc = simulate.score_level_router(gen.snr, n, k, sd_ratio=gen.sd_ratio, trials=config.score_trials,
                                         seed=int(next(seeds)))
        rows.append(dict(common, **{c: sc[c].iloc[0] for c in ("method", "backend", "hits", "trials", "estimate",
                                                                "ci_low", "ci_high")}))
        vec = simulate.vector_level_router(d, N, B, k, mu_s, m=m, mu_cluster=mu_c, trials=trials_mc,
                                           seed=int(next(seeds)), planted=config.planted, device=device)
        rows.append(dict(common, **{c: vec[c].iloc[0] for c in ("method", "backend", "hits", "trials", "estimate",
                                                                 "ci_low", "ci_high")}))
    df = pd.DataFrame(rows)
    mc = df["method"].isin(["score-level", "vector-level"])
    df.loc[mc, "interval_units"] = interval_units(df.loc[mc, "prediction"], df.loc[mc, "hits"], df.loc[mc, "trials"])
    df.loc[mc, "paper_interval_units"] = interval_units(df.loc[mc, "paper_prediction"], df.loc[mc, "hits"],
                                                        df.loc[mc, "trials"])
    vec = df["method"] == "vector-level"
    for col, src in (("snr_measured", "estimate"), ("snr_measured_low", "ci_low"), ("snr_measured_high", "ci_high")):
        df.loc[vec, col] = [measured_snr(p, n, k, r) for p, n, k, r in
                            df.loc[vec, [src, "n_blocks", "top_k", "sd_ratio"]].itertuples(index=False)]
    df.insert(0, "experiment", NAME)
    df.insert(1, "run_seed", config.seed)
    return integer_columns(df, ("run_seed", "hits", "trials", "m", "n_blocks", "top_k", "head_dim", "block_size",
                                "seq_len"))


def _slope(x: np.ndarray, y: np.ndarray) -> float:
    ok = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    if ok.sum() < 2:
        return math.nan
    return float(np.polyfit(np.log(x[ok]), np.log(y[ok]), 1)[0])


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per sweep (and d for ``clt``): points, worst |interval units| of the Monte Carlo legs against the
    generator and the paper predictions, and the log-log slope of SNR against the swept variable
    (paper: -1/2 in B, +1/2 in d) for the paper's SNR and for the SNR measured from the vector leg."""
    check_table(df, NAME, "summary", _SUMMARY_COLUMNS)
    out = []
    clt_dim = df["head_dim"].where(df["sweep"] == "clt", 0).rename("clt_dim")  # split only the clt sweep by d
    for (sweep, d), g in df.groupby([df["sweep"], clt_dim], sort=False):
        var = "head_dim" if sweep == "head dim" else "block_size"
        vec = g[g["method"] == "vector-level"].sort_values(var)
        sco = g[g["method"] == "score-level"]
        out.append({
            "sweep": sweep if sweep != "clt" else f"clt (d={d})",
            "points": len(vec),
            "vector_trials": int(vec["trials"].median()),
            "score_max_abs_units": float(sco["interval_units"].abs().max()),
            "vector_max_abs_units": float(vec["interval_units"].abs().max()),
            "vector_vs_paper_max_abs_units": float(vec["paper_interval_units"].abs().max()),
            "max_abs_gen_minus_paper": float((vec["prediction"] - vec["paper_prediction"]).abs().max()),
            "paper_snr_slope": _slope(vec[var].to_numpy(float), vec["paper_snr"].to_numpy(float)),
            "measured_snr_slope": _slope(vec[var].to_numpy(float), vec["snr_measured"].to_numpy(float)),
        })
    return pd.DataFrame(out)


_STYLE = {
    "paper": dict(color="0.35", ls="--", lw=1.6, label=r"paper model ($\sigma^2=1/d$)"),
    "generator": dict(color="tab:blue", ls="-", lw=2.0, label="exact generator variance (Gaussian)"),
    "score-level": dict(marker="o", color="tab:orange", ms=5, ls="none", label="score-level MC (95% CI)"),
    "vector-level": dict(marker="s", color="tab:green", ms=6, mfc="none", ls="none",
                         label="vector-level MC (95% CI)"),
}


def _errorbar(ax, x, pts, col="estimate", lo="ci_low", hi="ci_high", **style):
    y = pts[col].to_numpy(float)
    err = np.vstack([y - pts[lo].to_numpy(float), pts[hi].to_numpy(float) - y])
    ax.errorbar(x, y, yerr=np.clip(np.nan_to_num(err, nan=0.0), 0, None), capsize=3, **style)


def _log2_axis(ax, values, label):
    ax.set_xscale("log", base=2)
    ticks = sorted(set(int(v) for v in values))
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel(label)


def plot(df: pd.DataFrame):
    """3 x 3 figure: P(hit) and SNR along the three design sweeps; the CLT sweep and its interval units."""
    check_table(df, NAME, "plot", _PLOT_COLUMNS)
    import matplotlib.pyplot as plt
    import matplotlib.ticker as mticker

    fig, axes = plt.subplots(3, 3, figsize=(17, 14))
    main = [s for s in ("fixed k/n", "fixed k", "head dim") if s in set(df["sweep"])]
    for col, sweep in enumerate(main):
        g = df[df["sweep"] == sweep]
        var = "head_dim" if sweep == "head dim" else "block_size"
        first = g.iloc[0]
        if sweep == "fixed k/n":
            title = f"fixed sparsity k/n = {first['top_k'] / first['n_blocks']:.3g}, d = {first['head_dim']}"
        elif sweep == "fixed k":
            title = f"fixed top-k = {first['top_k']}, d = {first['head_dim']}"
        else:
            title = f"head dim, B = {first['block_size']}, k = {first['top_k']}, n = {first['n_blocks']}"
        title += f", N = {first['seq_len']}\nΔμ_eff = {first['delta_mu_eff']:.2g} (cosine units, m = {first['m']})"
        ax = axes[0, col]
        for method in ("paper", "generator"):
            a = g[g["method"] == method].sort_values(var)
            ax.plot(a[var], a["estimate"], **_STYLE[method])
        for method in ("score-level", "vector-level"):
            pts = g[g["method"] == method].sort_values(var)
            _errorbar(ax, pts[var], pts, **_STYLE[method])
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("P(hit): needle block in top-k")
        ax.set_ylim(-0.02, 1.02)
        _log2_axis(ax, g[var], "head dim d" if var == "head_dim" else "block size B (tokens)")
        ax.grid(alpha=0.3)
        if sweep != "head dim":
            ax2 = ax.secondary_xaxis("top", functions=(lambda b, N=first["seq_len"]: N / np.maximum(b, 1e-9),
                                                       lambda n, N=first["seq_len"]: N / np.maximum(n, 1e-9)))
            ax2.set_xticks(sorted(set(first["seq_len"] / g[var])))
            ax2.xaxis.set_major_formatter(mticker.FormatStrFormatter("%g"))
            ax2.xaxis.set_minor_locator(mticker.NullLocator())
            ax2.set_xlabel("n = N/B blocks", fontsize=9)
            ax2.tick_params(labelsize=8)

        ax = axes[1, col]
        a = g[g["method"] == "paper"].sort_values(var)
        ax.plot(a[var], a["paper_snr"], **dict(_STYLE["paper"], label=r"paper SNR $=\Delta\mu_{eff}\sqrt{d/2B}$"))
        ax.plot(a[var], a["snr"], **dict(_STYLE["generator"], label="exact generator SNR"))
        v = g[g["method"] == "vector-level"].sort_values(var)
        ok = np.isfinite(v["snr_measured"].to_numpy(float))
        if ok.any():
            vv = v[ok]
            lo = vv["snr_measured_low"].to_numpy(float)
            hi = vv["snr_measured_high"].to_numpy(float)
            y = vv["snr_measured"].to_numpy(float)
            top = np.nanmax(np.r_[a["paper_snr"], a["snr"], y]) * 1.6
            hi = np.where(np.isfinite(hi), hi, top)
            lo = np.where(np.isfinite(lo) & (lo > 0), lo, y * 0.5)
            ax.errorbar(vv[var], y, yerr=[np.clip(y - lo, 0, None), np.clip(hi - y, 0, None)], capsize=3,
                        **dict(_STYLE["vector-level"], label="measured from vector MC (P_hit inverted)"))
        # Every trial a hit: the SNR is only bounded below (by the Wilson lower end point).
        sat = v[np.isposinf(v["snr_measured"].to_numpy(float)) & np.isfinite(v["snr_measured_low"].to_numpy(float))]
        if not sat.empty:
            ax.plot(sat[var], sat["snr_measured_low"], marker="^", ls="none", color="tab:green",
                    label="all trials hit: lower bound")
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(mticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(mticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(mticker.NullFormatter())
        _log2_axis(ax, g[var], "head dim d" if var == "head_dim" else "block size B (tokens)")
        ax.set_ylabel("SNR (dimensionless, log scale)")
        slope = "+1/2 in d" if var == "head_dim" else "-1/2 in B"
        ax.set_title(f"SNR ∝ sqrt(d/B): slope {slope} on log axes", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8, loc="best")
    for col in range(len(main), 3):
        axes[0, col].set_visible(False)
        axes[1, col].set_visible(False)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    axes[0, 0].legend(handles, labels, fontsize=8, loc="lower right" if main and main[0] != "fixed k" else "best")

    clt = df[df["sweep"] == "clt"]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    ax_p, ax_u, ax_r = axes[2]
    if not clt.empty:
        for i, (d, g) in enumerate(clt.groupby("head_dim")):
            col = colors[i % len(colors)]
            a = g[g["method"] == "generator"].sort_values("block_size")
            ax_p.plot(a["block_size"], a["estimate"], color=col, lw=1.5, label=f"d = {d}: Gaussian prediction")
            v = g[g["method"] == "vector-level"].sort_values("block_size")
            _errorbar(ax_p, v["block_size"], v, marker="s", mfc="none", ls="none", color=col, ms=6,
                      label=f"d = {d}: vector-level MC (95% CI)")
            ax_u.plot(v["block_size"], v["interval_units"], marker="s", mfc="none", color=col,
                      label=f"d = {d}: vector MC vs Gaussian")
            s = g[g["method"] == "score-level"].sort_values("block_size")
            ax_u.plot(s["block_size"], s["interval_units"], marker="o", ls=":", color=col, alpha=0.7,
                      label=f"d = {d}: score MC vs Gaussian (control)")
        first = clt.iloc[0]
        ax_p.set_title(f"CLT check: n = {first['n_blocks']} blocks, k = {first['top_k']}, "
                       f"generator SNR fixed at {first['snr']:.2g}", fontsize=10)
        ax_p.set_ylabel("P(hit)")
        _log2_axis(ax_p, clt["block_size"], "block size B (tokens)")
        ax_p.legend(fontsize=8)
        ax_p.grid(alpha=0.3)
        ax_u.axhspan(-1, 1, color="0.85", label="inside the 95% interval")
        ax_u.axhline(0, color="0.4", lw=0.8)
        ax_u.set_title("Gaussian (CLT) prediction minus MC estimate,\nin units of the 95% interval "
                       "(> 0: MC finds fewer needles)", fontsize=10)
        ax_u.set_ylabel("interval units")
        _log2_axis(ax_u, clt["block_size"], "block size B (tokens)")
        ax_u.legend(fontsize=8)
        ax_u.grid(alpha=0.3)
    else:
        ax_p.set_visible(False)
        ax_u.set_visible(False)

    # What the exact generator variance changes: SNR_gen / SNR_paper along the block-size sweep.
    g = df[(df["sweep"] == "fixed k/n") & (df["method"] == "generator")].sort_values("block_size")
    if not g.empty:
        ax_r.plot(g["block_size"], g["snr"] / g["paper_snr"], marker="o", color="tab:blue",
                  label=f"SNR_gen / SNR_paper (m = {g['m'].iloc[0]}, μ = {g['mu_signal'].iloc[0]:.2g})")
        ax_r.plot(g["block_size"], g["sd_ratio"], marker="^", color="tab:purple",
                  label="σ_signal / σ_noise of the block score")
        ax_r.axhline(1.0, color="0.4", ls="--", lw=1, label="paper: equal variances 1/(dB)")
        _log2_axis(ax_r, g["block_size"], "block size B (tokens)")
        ax_r.set_ylabel("ratio (dimensionless)")
        ax_r.set_title("exact generator variance vs the paper's 1/d:\nplanted tokens carry (1-μ²)/d", fontsize=10)
        ax_r.legend(fontsize=8)
        ax_r.grid(alpha=0.3)
    else:
        ax_r.set_visible(False)
    fig.suptitle("block-size: the sqrt(d/B) law — paper model, exact generator, score- and vector-level Monte Carlo",
                 fontsize=13)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    return fig
