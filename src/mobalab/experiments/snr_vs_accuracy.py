"""snr-vs-accuracy: the analytic top-k hit probability against Monte Carlo, panel by panel.

For each (n blocks, top-k) panel the figure shows

* the paper's rule of thumb, SNR > Φ⁻¹(1 - k/n) (a vertical line);
* the exact analytic curve P_hit(SNR) = ∫ φ(z)·BinomCDF(k-1; n-1, Φ̄(z + √2·SNR)) dz
  (:func:`mobalab.snr.hit_probability`);
* score-level Monte Carlo (block scores sampled from the Gaussian model) with 95% Wilson intervals;
* vector-level Monte Carlo (unit vectors, centroids and the exact MoBA routing rules) with 95% Wilson
  intervals. Each vector-level point sits at the *exact* SNR of its generator
  (:func:`mobalab.snr.generator_block_model`); its prediction uses that SNR and the generator's
  signal/noise standard-deviation ratio. On a GPU every point has ``vector_trials`` trials; on the CPU a
  point draws at most ``vector_cpu_tokens`` keys (trials × n·B), so long panels get fewer trials (never
  fewer than ``vector_cpu_min_trials``) and wider intervals, and the full run finishes in minutes on a
  2-core CPU. Every row holds its ``trials`` and interval; ``summary`` reports the widest interval;
* the kernel's routing (method ``kernel``): :func:`mobalab.kernels.moba_topk`, non-causal, on the same
  planted-needle generator and SNR points as the vector leg, laid out as (batch, N, heads, d) with every
  (batch row, head) an independent trial (the query occupies every row of its sequence; row 0 is read).
  With a usable GPU it runs the CUDA kernel in fp16 on panels with n·B <= ``kernel_max_seq_len``
  (``backend`` "cuda-kernel"); otherwise the torch reference in fp32 on panels with
  n·B <= ``kernel_cpu_max_seq_len`` (``backend`` "torch-reference"). ``device`` names the hardware.

Every Monte Carlo row carries ``interval_units``: how far the exact prediction lies from the estimate in
units of the 95% interval's half-width (|u| <= 1: inside). ``summary`` reports the largest per panel.
``run_seed`` is the run's seed (``Config.seed``); ``seed`` the stream each score- and vector-level row was
drawn from (kernel rows draw from streams spawned from ``(run_seed, 1)`` and leave it empty).
:func:`plan` says before a run which device each leg uses and how many trials it draws.

Columns of the CSV (one row per analytic curve point or Monte Carlo point; a column a leg has no value for is
empty). Probabilities are fractions in [0, 1]; SNR, ``sd_ratio`` and the interval units are dimensionless:

* ``experiment``, ``run_seed``; ``panel`` ("n=64, k=8"), ``n_blocks``, ``top_k``, ``paper_threshold`` (the
  rule-of-thumb SNR Φ⁻¹(1 - k/n));
* ``method`` ("analytic", "score-level", "vector-level", "kernel"), ``backend`` (what computed it: "numpy",
  "torch-cpu", "torch-cuda", "torch-reference", "cuda-kernel"), ``device`` (kernel rows: the hardware);
* ``snr`` (the x axis of the figure), ``sd_ratio`` (signal / noise standard deviation of the block score),
  ``target_snr`` (the ``mc_snr`` value the vector and kernel points were built for);
* ``estimate`` (the y axis: P(hit), the analytic value or hits / trials), ``prediction`` (the exact
  analytic P(hit) at the row's ``snr`` and ``sd_ratio``), ``hits``, ``trials``, ``ci_low``, ``ci_high``
  (95% Wilson interval, the figure's error bars), ``interval_units``, ``seed``;
* the generator of the vector and kernel legs: ``head_dim`` (d), ``block_size`` (B, tokens), ``seq_len``
  (n·B tokens), ``m`` (planted tokens, needle included), ``mu_signal`` and ``mu_cluster`` (their cosine with
  the query), ``planted``, ``key_conv``, ``causal``, ``query_pos``, ``needle_pos``, ``batch_size`` and the
  score leg's ``sampler`` (:func:`mobalab.simulate.vector_level_router`,
  :func:`mobalab.simulate.score_level_router`).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from mobalab import simulate, snr
from mobalab.stats import interval_units

from ._checks import check_counts, check_seed, is_count
from ._columns import check_table, integer_columns
from ._devices import kernel_backend, resolve_device

__all__ = ["Config", "run", "plot", "summary", "plan", "vector_point", "kernel_point", "vector_trials"]

NAME = "snr-vs-accuracy"

#: columns of the tidy table that plot and summary read (check_table names the missing ones)
_PLOT_COLUMNS = ("backend", "ci_high", "ci_low", "estimate", "method", "n_blocks", "panel", "paper_threshold", "snr",
                 "top_k")
_SUMMARY_COLUMNS = ("ci_high", "ci_low", "estimate", "interval_units", "method", "panel", "paper_threshold", "trials")


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
    vector_cpu_tokens: int = 1 << 23  # CPU: keys per SNR point at most (trials x n·B); see the module docstring
    vector_cpu_min_trials: int = 100  # CPU: but never fewer trials than this
    kernel: bool = True  # the kernel leg (moba_topk on planted-needle inputs)
    kernel_device: str = "auto"  # "auto" (CUDA kernel when a GPU is usable), "cpu" (torch reference), "cuda"
    kernel_trials: int = 2048  # per SNR point on the GPU
    kernel_max_seq_len: int = 1 << 20  # GPU: panels with n·B above this skip the kernel leg
    kernel_cpu_trials: int = 128  # per SNR point on the CPU reference (it routes all n·B rows of each trial)
    kernel_cpu_max_seq_len: int = 2048  # CPU: panels with n·B above this skip the kernel leg
    kernel_heads: int = 16
    seed: int = 0

    @classmethod
    def quick(cls, **overrides) -> Config:
        """A CPU run that finishes in well under a minute."""
        base = dict(score_trials=20_000, vector_trials=200, vector_max_seq_len=8192, curve_points=81,
                    kernel_cpu_trials=64, kernel_cpu_max_seq_len=1024)
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


def vector_trials(config: Config, seq_len: int, device: str | None = None) -> int:
    """Vector-level trials per SNR point for a panel of ``seq_len`` = n·B tokens on ``device``.

    On a GPU (a device string starting with "cuda") ``config.vector_trials``; on the CPU
    ``min(vector_trials, max(vector_cpu_min_trials, vector_cpu_tokens // seq_len))``, so that no point
    draws more than about ``vector_cpu_tokens`` keys. ``device`` defaults to the config's, resolved
    ("auto": CUDA when torch sees a GPU).

    Examples
    --------
    >>> from mobalab.experiments.snr_vs_accuracy import Config, vector_trials
    >>> [vector_trials(Config(), n * 16, "cpu") for n in (64, 512, 4096)]
    [2000, 1024, 128]
    >>> vector_trials(Config(), 4096 * 16, "cuda")
    2000
    """
    device = resolve_device(config.device) if device is None else str(device)
    if device.startswith("cuda"):
        return config.vector_trials
    budget = max(config.vector_cpu_min_trials, config.vector_cpu_tokens // max(1, seq_len))
    return max(1, min(config.vector_trials, budget))


def plan(config: Config = Config()) -> str:
    """What :func:`run` will do, said before it starts (the CLI prints it): the device and trials of each leg.

    Examples
    --------
    >>> from mobalab.experiments.snr_vs_accuracy import Config, plan
    >>> print(plan(Config(device="cpu", kernel=False)))  # doctest: +NORMALIZE_WHITESPACE
    score level: numpy, 100000 trials per point; vector level on cpu: 2000, 1024, 128, 2000 trials per point
    for n = 64, 512, 4096, 128 (CPU: fewer trials for long panels, wider intervals; 2.1e+08 keys to draw);
    kernel leg off
    """
    _check(config)
    device = resolve_device(config.device)
    panels = [(n, n * config.vector_block_size) for n, _ in config.panels]
    vec = [(n, vector_trials(config, seq, device)) for n, seq in panels if seq <= config.vector_max_seq_len]
    text = f"score level: numpy, {config.score_trials} trials per point; "
    if vec:
        keys = sum(t * n * config.vector_block_size for n, t in vec) * len(config.mc_snr)
        text += (f"vector level on {device}: {', '.join(str(t) for _, t in vec)} trials per point for "
                 f"n = {', '.join(str(n) for n, _ in vec)}")
        if not device.startswith("cuda"):
            text += f" (CPU: fewer trials for long panels, wider intervals; {keys:.2g} keys to draw)"
    else:
        text += "vector level: no panel within vector_max_seq_len"
    if not config.kernel:
        return text + "; kernel leg off"
    _, name, device_name, _ = kernel_backend(config.kernel_device)
    limit, trials = _kernel_limits(config, name)
    ker = [n for n, seq in panels if seq <= limit]
    if not ker:
        return text + f"; kernel leg ({name}): no panel with n·B <= {limit}"
    return text + (f"; kernel leg: {name} on {device_name}, {trials} trials per point for "
                   f"n = {', '.join(str(n) for n in ker)}")


def kernel_point(n_blocks: int, top_k: int, head_dim: int, block_size: int, mu: float, m: int, trials: int,
                 seed, device, dtype, planted: str = "isotropic", heads: int = 16, max_tokens: int = 1 << 24):
    """Hits of ``moba_topk`` (non-causal) over ``trials`` planted-needle sequences; returns (hits, trials).

    Each trial is one (batch row, head) of a (batch, N = n·B, heads, d) call: q uniform on the sphere (in
    every row of the sequence), N keys uniform on the sphere, the needle (cosine ``mu``) at a uniform
    position and ``m - 1`` clustered keys (cosine ``mu``) at random positions of the needle's block, as
    :func:`mobalab.simulate.vector_level_router` draws them. A hit: the needle's block among row 0's
    selected blocks. Calls hold at most ``max_tokens`` tokens; the trial count is rounded up to whole calls.
    """
    import torch

    from mobalab.kernels import moba_topk
    from mobalab.simulate import plant_into, random_cluster_positions, random_unit_vectors

    seq_len = n_blocks * block_size
    h = max(1, min(heads, trials, max_tokens // seq_len))
    b = max(1, min(math.ceil(trials / h), max_tokens // (seq_len * h)))
    calls = math.ceil(trials / (b * h))
    rng = np.random.default_rng(seed)
    hits = done = 0
    for _ in range(calls):
        gen = torch.Generator(device=device).manual_seed(int(rng.integers(2**62)))
        count = b * h
        needle = rng.integers(0, seq_len, size=count)
        cluster = random_cluster_positions(rng, needle, block_size, seq_len, m - 1)
        q = random_unit_vectors(gen, (count,), head_dim)
        keys = random_unit_vectors(gen, (count, seq_len), head_dim)
        plant_into(gen, q, keys, torch.as_tensor(needle, device=device), torch.as_tensor(cluster, device=device),
                   mu, mu, planted)
        k4 = keys.view(b, h, seq_len, head_dim).permute(0, 2, 1, 3).to(dtype)
        q4 = q.view(b, h, 1, head_dim).permute(0, 2, 1, 3).expand(b, seq_len, h, head_dim).to(dtype)
        if device.type == "cuda":
            k4, q4 = k4.contiguous(), q4.contiguous()
        with torch.no_grad():
            sel = moba_topk(q4, k4, block_size, top_k, causal=False)[:, 0]  # (b, h, top_k)
        target = torch.as_tensor(needle // block_size, device=device).view(b, h, 1)
        hits += int((sel == target).any(-1).sum())
        done += count
    return hits, done


def _kernel_limits(config: Config, backend_name: str) -> tuple[int, int]:
    """(largest n·B, trials per point) of the kernel leg on this backend."""
    return ((config.kernel_max_seq_len, config.kernel_trials) if backend_name == "cuda-kernel"
            else (config.kernel_cpu_max_seq_len, config.kernel_cpu_trials))


def _kernel_rows(config: Config, common: dict, n: int, k: int, mc_snr, seeds, backend, bar=None
                 ) -> list[pd.DataFrame]:
    from mobalab.stats import wilson_interval

    device, name, device_name, dtype = backend
    limit, trials = _kernel_limits(config, name)
    if n * config.vector_block_size > limit:
        return []
    rows = []
    for s, seed in zip(mc_snr, seeds, strict=True):
        m, mu, model = vector_point(float(s), config.vector_head_dim, config.vector_block_size,
                                    config.vector_max_mu, config.planted)
        hits, done = kernel_point(n, k, config.vector_head_dim, config.vector_block_size, mu, m, trials, seed,
                                  device, dtype, config.planted, config.kernel_heads)
        lo, hi = wilson_interval(hits, done)
        rows.append(dict(common, method="kernel", backend=name, device=device_name, snr=float(model.snr),
                         sd_ratio=float(model.sd_ratio), target_snr=float(s), m=m, mu_signal=mu, hits=hits,
                         trials=done, estimate=hits / done, ci_low=float(lo), ci_high=float(hi),
                         prediction=float(snr.hit_probability(model.snr, n, k, sd_ratio=model.sd_ratio))))
        if bar is not None:
            bar.update(1)
    return [pd.DataFrame(rows)] if rows else []


def _check(config: Config) -> None:
    """ValueError naming the first setting that no run can honour."""
    check_seed(config.seed)
    check_counts(config, "vector_trials", "vector_cpu_tokens", "vector_cpu_min_trials", "score_trials")
    panels = config.panels
    if not panels or any(len(p) != 2 for p in panels):
        raise ValueError(f"panels must be a non-empty tuple of (n_blocks, top_k) pairs, got {panels!r}")
    for n, k in panels:
        # k > n would select blocks that do not exist: the panel would show P(hit) = 1 and a chance above 1
        if not (is_count(n) and is_count(k) and k <= n):
            raise ValueError(f"each panel (n_blocks, top_k) needs integers 1 <= top_k <= n_blocks, got ({n!r}, {k!r})")
    snr_max = config.snr_max
    if isinstance(snr_max, bool) or not isinstance(snr_max, numbers.Real) or not (math.isfinite(snr_max)
                                                                                   and snr_max > 0):
        raise ValueError(f"snr_max must be a finite number > 0, got {snr_max!r}")
    if not is_count(config.curve_points) or config.curve_points < 2:
        raise ValueError(f"curve_points must be an integer >= 2, got {config.curve_points!r}")
    mc = np.asarray(config.mc_snr, dtype=float)
    # the vector and kernel legs plant cosines >= 0, which reach no SNR below 0
    if mc.ndim != 1 or not mc.size or not np.all(np.isfinite(mc)) or np.any(mc < 0):
        raise ValueError(f"mc_snr must be a non-empty tuple of finite SNRs >= 0, got {config.mc_snr!r}")
    if config.kernel or any(n * config.vector_block_size <= config.vector_max_seq_len for n, _ in panels):
        for s in mc:  # an SNR beyond the cosine cap: said now, not after the panels before it have run
            vector_point(float(s), config.vector_head_dim, config.vector_block_size, config.vector_max_mu,
                         config.planted)


def run(config: Config = Config(), progress: bool = False) -> pd.DataFrame:
    """Analytic curves plus score- and vector-level Monte Carlo points (and the kernel leg); one tidy row per
    point. See the module docstring for the legs and :func:`plan` for what a configuration will draw.

    Examples
    --------
    >>> from mobalab.experiments import snr_vs_accuracy as exp
    >>> cfg = exp.Config(panels=((16, 2),), mc_snr=(1.0,), score_trials=2000, vector_trials=100, curve_points=3,
    ...                  device="cpu", kernel=False, seed=1)
    >>> df = exp.run(cfg)
    >>> df.groupby("method").size().to_dict(), int(df["run_seed"].iloc[0])
    ({'analytic': 3, 'score-level': 1, 'vector-level': 1}, 1)
    >>> exp.summary(df)[["method", "points", "trials"]].values.tolist()
    [['score-level', 1, 2000], ['vector-level', 1, 100]]
    """
    _check(config)
    seeds = iter(np.random.SeedSequence(config.seed).generate_state(4 * len(config.panels) * (len(config.mc_snr) + 1)))
    device = resolve_device(config.device)
    curve = np.linspace(0.0, config.snr_max, config.curve_points)
    mc_snr = np.asarray(config.mc_snr, dtype=float)
    rows = []
    jobs = [(n, k) for n, k in config.panels]
    # The kernel leg has its own streams, so that adding it leaves the other legs' numbers unchanged.
    kernel_seeds = np.random.SeedSequence([config.seed, 1]).spawn(len(jobs) * len(mc_snr))
    backend = kernel_backend(config.kernel_device) if config.kernel else None
    kernel_panels = 0 if backend is None else sum(
        n * config.vector_block_size <= _kernel_limits(config, backend[1])[0] for n, _ in jobs)
    bar = tqdm(total=(len(jobs) + len(jobs) * len(mc_snr) + kernel_panels * len(mc_snr)), desc=NAME,
               disable=not progress)
    for j, (n, k) in enumerate(jobs):
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
                causal=False, trials=vector_trials(config, seq_len, device), seed=seed, planted=config.planted,
                device=device)
            vec = vec.assign(**common, snr=model.snr, sd_ratio=model.sd_ratio, target_snr=float(s),
                             prediction=snr.hit_probability(model.snr, n, k, sd_ratio=model.sd_ratio))
            rows.append(vec)
            bar.update(1)
        if backend is not None:
            rows += _kernel_rows(config, common, n, k, mc_snr,
                                 kernel_seeds[j * len(mc_snr):(j + 1) * len(mc_snr)], backend, bar)
    bar.close()
    df = pd.concat(rows, ignore_index=True)
    mc = df["method"] != "analytic"
    df.loc[mc, "interval_units"] = interval_units(df.loc[mc, "prediction"], df.loc[mc, "hits"],
                                                  df.loc[mc, "trials"])
    df.insert(0, "experiment", NAME)
    df.insert(1, "run_seed", config.seed)
    return integer_columns(df, ("run_seed", "seed", "hits", "trials", "n_blocks", "top_k", "head_dim", "seq_len",
                                "block_size", "m", "batch_size"))


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per panel and Monte Carlo method: points, trials per point (the fewest), the widest 95% interval's
    half-width, the largest |disagreement| in interval units and how many points lie inside their interval."""
    check_table(df, NAME, "summary", _SUMMARY_COLUMNS)
    mc = df[df["method"] != "analytic"].copy()
    mc["abs_units"] = mc["interval_units"].abs()
    mc["half_width"] = (mc["ci_high"] - mc["ci_low"]) / 2
    out = (mc.groupby(["panel", "method"], sort=False)
             .agg(points=("estimate", "size"), trials=("trials", "min"), max_half_width=("half_width", "max"),
                  max_abs_units=("abs_units", "max"), inside_95=("abs_units", lambda u: int((u <= 1).sum())))
             .reset_index())
    out["trials"] = out["trials"].astype(int)
    out["paper_threshold"] = out["panel"].map(df.groupby("panel")["paper_threshold"].first())
    return out


def plot(df: pd.DataFrame):
    """One panel per (n, k): analytic curve, paper threshold, Monte Carlo points with 95% intervals; a panel
    that a leg of the run skipped (n·B above the leg's limit) names that leg."""
    check_table(df, NAME, "plot", _PLOT_COLUMNS)
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys(df["panel"]))
    ncols = min(2, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.2 * ncols, 4.3 * nrows), squeeze=False, sharey=True)
    styles = {"score-level": dict(marker="o", color="tab:orange", ms=5),
              "vector-level": dict(marker="s", color="tab:green", ms=5, mfc="none"),
              "kernel": dict(marker="^", color="tab:red", ms=6)}
    run_legs = [m for m in styles if (df["method"] == m).any()]
    for ax, panel in zip(axes.flat, panels, strict=False):
        d = df[df["panel"] == panel]
        # a leg skips panels above its length limit (vector_max_seq_len, the kernel's n·B limit): say so on
        # the panel rather than leave a reader to assume its points agree there too
        skipped = [m for m in run_legs if not (d["method"] == m).any()]
        if skipped:
            ax.text(0.98, 0.04, f"not run for this panel (n·B above its limit): {', '.join(skipped)}",
                    transform=ax.transAxes, ha="right", va="bottom", fontsize=8, color="0.35")
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
            label = (f"kernel moba_topk, {pts['backend'].iloc[0]} (95% CI)" if method == "kernel"
                     else f"{method} MC (95% CI)")
            ax.errorbar(pts["snr"], pts["estimate"], yerr=err, ls="none", capsize=3, label=label, **st)
        n, k = int(d["n_blocks"].iloc[0]), int(d["top_k"].iloc[0])
        ax.set_title(f"n = {n} blocks, top-k = {k}  (chance k/n = {k / n:.3g})")
        ax.set_xlabel(r"SNR $= \Delta\mu_{eff}\,\sqrt{d/2B}$ (dimensionless)")
        ax.set_ylabel("P(hit): needle block in top-k")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    legend = {}  # every panel's entries, first occurrence kept (the kernel leg may skip the first panel)
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(lab, h)
    labels, handles = list(legend), list(legend.values())
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 3), frameon=False,
               bbox_to_anchor=(0.5, -0.02))
    fig.suptitle("MoBA routing accuracy: exact theory vs Monte Carlo and the kernel (non-causal top-k)", y=1.0)
    fig.tight_layout(rect=(0, 0.05, 1, 0.98))
    return fig
