"""snr-vs-accuracy: the analytic top-k hit probability against Monte Carlo, panel by panel.

For each (n blocks, top-k) panel the figure shows

* the paper's rule of thumb, SNR > Φ⁻¹(1 - k/n) (a vertical line);
* the exact analytic curve P_hit(SNR) = ∫ φ(z)·BinomCDF(k-1; n-1, Φ̄(z + √2·SNR)) dz
  (:func:`mobalab.snr.hit_probability`);
* score-level Monte Carlo (block scores sampled from the Gaussian model) with 95% Wilson intervals;
* vector-level Monte Carlo (unit vectors, centroids and the exact MoBA routing rules) with 95% Wilson
  intervals. Each vector-level point sits at the *exact* SNR of its generator
  (:func:`mobalab.snr.generator_block_model`); its prediction uses that SNR and the generator's
  signal/noise standard-deviation ratio.

Every Monte Carlo row carries ``interval_units``: how far the exact prediction lies from the estimate in
units of the 95% interval's half-width (|u| <= 1: inside). ``summary`` reports the largest per panel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from mobalab import simulate, snr
from mobalab.stats import interval_units

__all__ = ["Config", "run", "plot", "summary", "vector_point"]

NAME = "snr-vs-accuracy"


@dataclass(frozen=True)
class Config:
    """What to sweep. ``panels`` are (n_blocks, top_k) pairs."""

    panels: tuple[tuple[int, int], ...] = ((64, 8), (512, 8), (4096, 8), (128, 2))
    snr_max: float = 4.0
    curve_points: int = 161
    mc_snr: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0)
    score_trials: int = 100_000
    vector_trials: int = 2_000
    vector_head_dim: int = 64
    vector_block_size: int = 16
    vector_max_seq_len: int = 1 << 20  # panels with n·B above this skip the vector leg
    vector_max_mu: float = 0.8
    planted: str = "isotropic"
    device: str = "auto"  # vector leg: "auto" (CUDA when present), "cpu" or a torch device string
    seed: int = 0

    @classmethod
    def quick(cls, **overrides) -> Config:
        """A CPU run that finishes in well under a minute."""
        base = dict(score_trials=20_000, vector_trials=200, vector_max_seq_len=8192, curve_points=81)
        base.update(overrides)
        return cls(**base)


def vector_point(target_snr: float, head_dim: int, block_size: int, max_mu: float = 0.8,
                 planted: str = "isotropic"):
    """Generator parameters (m, μ) whose exact SNR is ``target_snr``, with the fewest clustered tokens.

    The needle and its m-1 clustered companions share one cosine μ, so Δμ_eff = m·μ and, for the
    isotropic generator, SNR = m·μ·sqrt(d) / sqrt(2B - m·μ²). Solving for μ:
    μ = S·sqrt(2B / (m²·d + m·S²)). The smallest m with μ <= ``max_mu`` is returned, with the
    generator's :class:`~mobalab.snr.BlockScoreModel`.
    """
    if target_snr <= 0:
        return 1, 0.0, snr.generator_block_model(head_dim, block_size, 0.0, planted=planted)
    d, B, S = head_dim, block_size, target_snr
    for m in range(1, B + 1):
        if planted == "isotropic":
            mu = S * math.sqrt(2 * B / (m * m * d + m * S * S))
        else:  # exact cosines: planted tokens add no variance, SNR = m·μ·sqrt(d)/sqrt(2B - m)
            mu = S * math.sqrt(2 * B - m) / (m * math.sqrt(d))
        if mu <= max_mu:
            model = snr.generator_block_model(head_dim, block_size, mu, m=m, mu_cluster=mu, planted=planted)
            return m, mu, model
    raise ValueError(f"SNR {target_snr} is out of reach for d={head_dim}, B={block_size} with cosines <= {max_mu}")


def _resolve_device(device: str) -> str:
    if device != "auto":
        return device
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:  # pragma: no cover
        return "cpu"


def run(config: Config = Config(), progress: bool = False) -> pd.DataFrame:
    """Analytic curves plus score- and vector-level Monte Carlo points; one tidy row per point."""
    seeds = iter(np.random.SeedSequence(config.seed).generate_state(4 * len(config.panels) * (len(config.mc_snr) + 1)))
    device = _resolve_device(config.device)
    curve = np.linspace(0.0, config.snr_max, config.curve_points)
    mc_snr = np.asarray(config.mc_snr, dtype=float)
    rows = []
    jobs = [(n, k) for n, k in config.panels]
    bar = tqdm(total=len(jobs) * (1 + len(mc_snr)), desc=NAME, disable=not progress)
    for n, k in jobs:
        panel = f"n={n}, k={k}"
        common = dict(panel=panel, n_blocks=n, top_k=k, paper_threshold=float(snr.paper_threshold(n, k)))
        p = snr.hit_probability(curve, n, k)
        rows.append(pd.DataFrame(dict(common, method="analytic", backend="numpy", snr=curve, sd_ratio=1.0,
                                      estimate=p, prediction=p)))

        score = simulate.score_level_router(mc_snr, n, k, trials=config.score_trials, seed=int(next(seeds)))
        score = score.assign(**common, prediction=snr.hit_probability(score["snr"].to_numpy(), n, k,
                                                                      sd_ratio=score["sd_ratio"].to_numpy()))
        rows.append(score)
        bar.update(1)

        seq_len = n * config.vector_block_size
        for s in mc_snr:
            seed = int(next(seeds))
            if seq_len > config.vector_max_seq_len:
                bar.update(1)
                continue
            m, mu, model = vector_point(float(s), config.vector_head_dim, config.vector_block_size,
                                        config.vector_max_mu, config.planted)
            vec = simulate.vector_level_router(
                config.vector_head_dim, seq_len, config.vector_block_size, k, mu, m=m, mu_cluster=mu,
                causal=False, trials=config.vector_trials, seed=seed, planted=config.planted, device=device)
            vec = vec.assign(**common, snr=model.snr, sd_ratio=model.sd_ratio, target_snr=float(s),
                             prediction=snr.hit_probability(model.snr, n, k, sd_ratio=model.sd_ratio))
            rows.append(vec)
            bar.update(1)
    bar.close()
    df = pd.concat(rows, ignore_index=True)
    mc = df["method"] != "analytic"
    df.loc[mc, "interval_units"] = interval_units(df.loc[mc, "prediction"], df.loc[mc, "hits"],
                                                  df.loc[mc, "trials"])
    df.insert(0, "experiment", NAME)
    return df


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per panel and Monte Carlo method: points, trials per point, largest |disagreement| in interval units."""
    mc = df[df["method"] != "analytic"].copy()
    mc["abs_units"] = mc["interval_units"].abs()
    out = (mc.groupby(["panel", "method"], sort=False)
             .agg(points=("estimate", "size"), trials=("trials", "median"),
                  max_abs_units=("abs_units", "max"), inside_95=("abs_units", lambda u: int((u <= 1).sum())))
             .reset_index())
    out["paper_threshold"] = out["panel"].map(df.groupby("panel")["paper_threshold"].first())
    return out


def plot(df: pd.DataFrame):
    """One panel per (n, k): analytic curve, paper threshold, Monte Carlo points with 95% intervals."""
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys(df["panel"]))
    ncols = min(2, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.2 * ncols, 4.3 * nrows), squeeze=False, sharey=True)
    styles = {"score-level": dict(marker="o", color="tab:orange", ms=5),
              "vector-level": dict(marker="s", color="tab:green", ms=5, mfc="none"),
              "kernel": dict(marker="^", color="tab:red", ms=6)}
    for ax, panel in zip(axes.flat, panels, strict=False):
        d = df[df["panel"] == panel]
        a = d[d["method"] == "analytic"].sort_values("snr")
        ax.plot(a["snr"], a["estimate"], color="tab:blue", lw=2, label="exact analytic $P_{hit}$")
        thr = d["paper_threshold"].iloc[0]
        if np.isfinite(thr):
            ax.axvline(thr, color="0.4", ls="--", lw=1.2, label=r"paper rule $\Phi^{-1}(1-k/n)$")
        for method, st in styles.items():
            pts = d[d["method"] == method]
            if pts.empty:
                continue
            err = np.vstack([pts["estimate"] - pts["ci_low"], pts["ci_high"] - pts["estimate"]])
            ax.errorbar(pts["snr"], pts["estimate"], yerr=err, ls="none", capsize=3, label=f"{method} MC (95% CI)",
                        **st)
        n, k = int(d["n_blocks"].iloc[0]), int(d["top_k"].iloc[0])
        ax.set_title(f"n = {n} blocks, top-k = {k}  (chance k/n = {k / n:.3g})")
        ax.set_xlabel(r"SNR $= \Delta\mu_{eff}\,\sqrt{d/2B}$ (dimensionless)")
        ax.set_ylabel("P(hit): needle block in top-k")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False, bbox_to_anchor=(0.5, -0.02))
    fig.suptitle("MoBA routing accuracy: exact theory vs Monte Carlo (non-causal top-k)", y=1.0)
    fig.tight_layout(rect=(0, 0.05, 1, 0.98))
    return fig
