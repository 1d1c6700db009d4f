r"""key-conv: does a key convolution raise Δμ_eff, as the paper's clustering multiplier says?

Synthetic sequences (unit vectors, :func:`mobalab.simulate.random_unit_vectors`): a query q, noise keys uniform on
the sphere, and L relevant keys of cosine μ with q, laid out relative to the needle's block j (uniform on
1..n-2, so that both neighbours exist) in one of three patterns:

* ``inside``: a span of L consecutive tokens in the middle of the block, with room for the convolution
  to spill W - 1 positions forward without leaving the block;
* ``cut``: a span of L tokens cut by the block's end: ceil(L/2) in the needle's block (the needle is the
  first), the rest in the next block (L = 1: the needle is the block's last token);
* ``scattered``: L tokens spread evenly over the block, B/L apart (not adjacent).

Each sequence goes through no convolution (W = 1) and a depthwise causal key convolution of width W
(:func:`mobalab.simulate.key_conv`) in two forms: ``linear`` averaging, k'_t = Σ_l k_{t-l}/W, and the
paper's ``residual_silu`` form, k'_t = k_t + SiLU(Σ_l w_l k_{t-l}) with the given weights w_l = gain/W.
All variants see the same vectors (common random numbers). Per (pattern, L, convolution):

* P(hit) (the needle's block in the plain top-k of n) with a 95% Wilson interval;
* measured clustering statistics from the convolved keys' cosines with q in the needle's block, aligned by
  position (the layout is fixed relative to the block): excess cosines e_t = E cos(q, k'_t) - μ_noise
  (μ_noise: the block before, untouched by the relevant tokens; e_t within 3 standard errors of 0 is
  set to 0), Δμ_eff = Σ e_t, m = participation ratio
  (Σe)²/Σe², μ_cluster - μ_noise = (Δμ_eff - e_needle)/(m - 1) (:func:`mobalab.snr.cluster_stats`), and
  ``multiplier`` = Δμ_eff / μ, the clustering multiplier 1 + (m-1)ρ relative to one unconvolved needle;
* three predictions of P(hit), each with its distance from the estimate in interval units:
  ``paper`` (the clustering multiplier: P_hit at SNR = Δμ_eff_measured·sqrt(d/2B), independent
  tokens of variance 1/d), ``moments`` (Gaussian block scores with the measured means and variances of
  the needle's block, the next block and far noise blocks: :func:`mobalab.snr.linear_conv_hit_probability`)
  and ``exact`` (the same integral with the exact moments of a linear convolution,
  :func:`mobalab.snr.linear_conv_block_model`; NaN for the SiLU form).

The convolution cannot raise the centroid's signal: the block score is linear in the keys, and a linear
filter with Σw = 1 only moves signal between neighbouring positions (and blocks) while correlating the
noise. The paper's formula, fed with the measured m and μ_cluster, sees more elevated keys and predicts a
gain (≈ sqrt(W) for a single needle) that the router does not show; spans cut by a boundary lose signal
to the next block, and the convolution pushes more of it there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from mobalab import simulate, snr
from mobalab.stats import interval_units, wilson_interval

from ._checks import check_counts, check_seed, is_count
from ._columns import check_table

__all__ = ["Config", "run", "plot", "summary", "plan", "relevant_offsets", "conv_variants"]

NAME = "key-conv"

#: columns of the tidy table that plot and summary read (check_table names the missing ones)
_PLOT_COLUMNS = ("block_size", "ci_high", "ci_low", "conv", "estimate", "exact_prediction", "head_dim",
                 "moments_prediction", "moments_snr", "mu", "multiplier", "n_blocks", "paper_prediction", "pattern",
                 "span", "top_k", "trials")
_SUMMARY_COLUMNS = ("change_vs_none", "ci_high", "ci_low", "conv", "exact_units", "form", "moments_units", "multiplier",
                    "paper_units", "pattern", "span")
PATTERNS = ("inside", "cut", "scattered")


@dataclass(frozen=True)
class Config:
    """What to sweep; relevant tokens have cosine ``mu``; block size ``block_size``, context ``seq_len``."""

    head_dim: int = 64
    block_size: int = 32
    seq_len: int = 2048
    top_k: int = 4
    mu: float = 0.5
    span_lengths: tuple[int, ...] = (1, 2, 4, 8)
    patterns: tuple[str, ...] = PATTERNS
    widths: tuple[int, ...] = (1, 3, 5)
    forms: tuple[str, ...] = ("linear", "residual_silu")
    silu_gain: float = 1.0
    trials: int = 2_000
    batch_size: int = 64
    seed: int = 0

    @classmethod
    def quick(cls, **overrides) -> Config:
        """A CPU run that finishes in well under a minute."""
        base = dict(seq_len=1024, top_k=2, trials=192)
        base.update(overrides)
        return cls(**base)


def relevant_offsets(pattern: str, span: int, block_size: int, max_width: int) -> np.ndarray:
    """Offsets of the L relevant tokens from the needle block's start (the needle is the first)."""
    B, L = block_size, span
    if pattern == "inside":
        if L + max_width - 1 > B:
            raise ValueError(f"a span of L = {L} with spill W - 1 = {max_width - 1} does not fit in B = {B}")
        start = (B - L - (max_width - 1)) // 2
        return np.arange(start, start + L)
    if pattern == "cut":
        if L > B:
            raise ValueError(f"a span of L = {L} is longer than the block B = {B}")
        start = B - math.ceil(L / 2)
        return np.arange(start, start + L)
    if pattern == "scattered":
        if L > B:
            raise ValueError(f"L = {L} scattered tokens do not fit in B = {B}")
        return np.unique(np.floor((np.arange(L) + 0.5) * B / L).astype(np.int64))
    raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")


def conv_variants(config: Config) -> list[tuple[str, str, int, object]]:
    """(label, form, W, KeyConv or None) for every convolution of the sweep; W = 1 is no convolution."""
    out = [("none (W=1)", "none", 1, None)]
    for form in config.forms:
        for W in config.widths:
            if W == 1:
                continue
            gain = 1.0 if form == "linear" else config.silu_gain
            kc = simulate.KeyConv(simulate.averaging_weights(W) * gain, form=form)
            label = f"{'averaging' if form == 'linear' else 'residual SiLU'} W={W}"
            out.append((label, form, W, kc))
    return out


def plan(config: Config = Config()) -> str:
    """What :func:`run` will do, said before it starts (the CLI prints it).

    Examples
    --------
    >>> from mobalab.experiments import key_conv
    >>> print(key_conv.plan(key_conv.Config.quick()))
    numpy on the CPU: 12 (pattern, L) groups x 192 trials, 5 convolutions each, N = 1024, B = 32
    """
    _check(config)
    groups = len(config.patterns) * len(config.span_lengths)
    return (f"numpy on the CPU: {groups} (pattern, L) groups x {config.trials} trials, "
            f"{len(conv_variants(config))} convolutions each, N = {config.seq_len}, B = {config.block_size}")


def _check(config: Config) -> None:
    check_seed(config.seed)
    check_counts(config, "block_size", "seq_len", "trials", "batch_size")
    if config.seq_len % config.block_size:
        raise ValueError(f"seq_len {config.seq_len} must be a multiple of block_size {config.block_size}")
    n = config.seq_len // config.block_size
    if n < 4:
        raise ValueError("need at least 4 blocks (the needle's block, both neighbours and a far noise block)")
    # top-k of all n blocks (or more) selects the needle's block whatever the convolution does
    if not is_count(config.top_k) or config.top_k >= n:
        raise ValueError(f"top_k must be an integer from 1 to n_blocks - 1 = {n - 1}, got {config.top_k!r}")
    for name, values in (("patterns", config.patterns), ("span_lengths", config.span_lengths),
                         ("widths", config.widths)):
        if not values:
            raise ValueError(f"{name} must not be empty")
    for p in config.patterns:
        if p not in PATTERNS:
            raise ValueError(f"patterns must be drawn from {PATTERNS}, got {p!r}")
    for name, values in (("span_lengths", config.span_lengths), ("widths", config.widths)):
        if not all(is_count(v) for v in values):
            raise ValueError(f"{name} must hold integers >= 1, got {values!r}")
    if not 0.0 < config.mu <= 1.0:
        raise ValueError(f"mu (cosine of the relevant tokens) must lie in (0, 1], got {config.mu}")


class _Acc:
    """Running sums over trials for one convolution variant."""

    def __init__(self, B):
        self.hits = 0
        self.cos = np.zeros(B)
        self.cos_sq = np.zeros(B)
        self.cos_noise = 0.0
        self.n_noise_tok = 0
        self.s = {key: [0.0, 0.0, 0] for key in ("signal", "next", "far")}

    def add(self, key, x):
        acc = self.s[key]
        acc[0] += float(x.sum())
        acc[1] += float((x.astype(np.float64) ** 2).sum())
        acc[2] += x.size

    def moments(self, key):
        s, sq, n = self.s[key]
        mean = s / n
        return mean, max(sq / n - mean * mean, 1e-300)


def _cosines(q, keys):
    return np.einsum("bd,btd->bt", q, keys) / np.linalg.norm(keys, axis=-1)


def run(config: Config = Config(), progress: bool = False) -> pd.DataFrame:
    """One row per (pattern, span length L, convolution): P(hit), clustering statistics, predictions.

    Examples
    --------
    >>> from mobalab.experiments import key_conv
    >>> cfg = key_conv.Config(seq_len=256, block_size=32, top_k=2, span_lengths=(2,), patterns=("inside",),
    ...                       widths=(1, 3), trials=32, seed=0)
    >>> list(key_conv.run(cfg)["conv"])
    ['none (W=1)', 'averaging W=3', 'residual SiLU W=3']
    """
    _check(config)
    c = config
    B, N, d, k = c.block_size, c.seq_len, c.head_dim, c.top_k
    n = N // B
    variants = conv_variants(c)
    max_w = max(c.widths)
    groups = [(p, L) for p in c.patterns for L in c.span_lengths]
    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(c.seed).spawn(len(groups))]
    rows = []
    bar = tqdm(total=len(groups) * c.trials, desc=NAME, disable=not progress, unit="trial")
    for (pattern, L), rng in zip(groups, rngs, strict=True):
        offs = relevant_offsets(pattern, L, B, max_w)
        accs = [_Acc(B) for _ in variants]
        for start in range(0, c.trials, c.batch_size):
            b = min(c.batch_size, c.trials - start)
            j = rng.integers(1, n - 1, size=b)
            pos = j[:, None] * B + offs[None, :]
            q = simulate.random_unit_vectors(rng, (b,), d)
            keys = simulate.random_unit_vectors(rng, (b, N), d)
            simulate.plant_into(rng, q, keys, pos[:, 0], pos[:, 1:], c.mu, c.mu, "isotropic")
            rows_b = np.arange(b)
            far = np.ones((b, n), dtype=bool)
            for dj in (-1, 0, 1):
                far[rows_b, j + dj] = False
            blk = j[:, None] * B + np.arange(B)[None, :]
            prev = blk - B
            for (_, _, _, kc), acc in zip(variants, accs, strict=True):
                kk = keys if kc is None else kc.apply(keys)
                scores = simulate.block_scores(q, kk, B)
                acc.hits += int(simulate.block_hit(scores, j, k).sum())
                cb = _cosines(q, kk[rows_b[:, None], blk]).astype(np.float64)
                acc.cos += cb.sum(axis=0)
                acc.cos_sq += (cb * cb).sum(axis=0)
                cn = _cosines(q, kk[rows_b[:, None], prev])
                acc.cos_noise += float(cn.sum())
                acc.n_noise_tok += cn.size
                acc.add("signal", scores[rows_b, j])
                acc.add("next", scores[rows_b, j + 1])
                acc.add("far", scores[far])
            bar.update(b)
        needle = int(offs[0])
        for (label, form, W, kc), acc in zip(variants, accs, strict=True):
            mu_noise = acc.cos_noise / acc.n_noise_tok
            mean_cos = acc.cos / c.trials
            se = np.sqrt(np.maximum(acc.cos_sq / c.trials - mean_cos**2, 0.0) / c.trials)
            # positions whose mean cosine is not distinguishable from noise (within 3 standard errors)
            # count as unelevated; otherwise sampling noise alone inflates the participation ratio m
            excess = np.where(np.abs(mean_cos - mu_noise) > 3.0 * se, mean_cos - mu_noise, 0.0)
            dmu, m, cluster = snr.cluster_stats(excess, needle)
            paper_snr = float(snr.snr(d, B, dmu))
            ms, vs = acc.moments("signal")
            mn, vn_next = acc.moments("next")
            mf, vf = acc.moments("far")
            measured = snr.LinearConvBlockModel(
                mean_signal=ms - mf, var_signal=vs, mean_next=mn - mf, var_next=vn_next, var_noise=vf,
                snr=(ms - mf) / math.sqrt(vs + vf), sd_ratio=math.sqrt(vs / vf), excess_cosines=excess,
                delta_mu_eff=dmu, m=m, mu_cluster=cluster, paper_snr=paper_snr)
            if form in ("none", "linear"):
                w = np.array([1.0]) if kc is None else np.asarray(kc.weights, dtype=float)
                exact = snr.linear_conv_block_model(d, B, w, offs, c.mu)
                exact_pred, exact_snr = snr.linear_conv_hit_probability(exact, n, k), exact.snr
            else:
                exact_pred, exact_snr = math.nan, math.nan
            lo, hi = wilson_interval(acc.hits, c.trials)
            rows.append(dict(
                pattern=pattern, span=L, conv=label, form=form, width=W, head_dim=d, block_size=B, seq_len=N,
                n_blocks=n, top_k=k, mu=c.mu, offsets=" ".join(str(o) for o in offs),
                in_block=int((offs < B).sum()), hits=acc.hits, trials=c.trials, estimate=acc.hits / c.trials,
                ci_low=float(lo), ci_high=float(hi), mu_noise=mu_noise, delta_mu_eff=dmu, m=m,
                mu_cluster=cluster + mu_noise, multiplier=dmu / c.mu, paper_snr=paper_snr,
                moments_snr=measured.snr, exact_snr=exact_snr,
                paper_prediction=float(snr.hit_probability(paper_snr, n, k)),
                moments_prediction=snr.linear_conv_hit_probability(measured, n, k),
                exact_prediction=exact_pred))
    bar.close()
    df = pd.DataFrame(rows)
    for kind in ("paper", "moments", "exact"):
        pred = df[f"{kind}_prediction"].to_numpy(float)
        units = np.full(len(df), np.nan)
        ok = np.isfinite(pred)
        units[ok] = interval_units(pred[ok], df["hits"].to_numpy()[ok], df["trials"].to_numpy()[ok])
        df[f"{kind}_units"] = units
    base = df[df["form"] == "none"].set_index(["pattern", "span"])["estimate"]
    df["change_vs_none"] = df["estimate"] - [base[(p, L)] for p, L in zip(df["pattern"], df["span"], strict=True)]
    df.insert(0, "experiment", NAME)
    df.insert(1, "run_seed", c.seed)
    return df


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per convolution: mean measured multiplier, worst |interval units| of each prediction, and where the
    convolution hurts (P(hit) below the unconvolved estimate by more than the two intervals allow)."""
    check_table(df, NAME, "summary", _SUMMARY_COLUMNS)
    out = []
    base = df[df["form"] == "none"].set_index(["pattern", "span"])
    for label, g in df.groupby("conv", sort=False):
        b = base.loc[list(zip(g["pattern"], g["span"], strict=True))]
        # a drop is "significant" when the conv's upper end point lies below the unconvolved lower one
        hurts = g["ci_high"].to_numpy() < b["ci_low"].to_numpy()
        helps = g["ci_low"].to_numpy() > b["ci_high"].to_numpy()
        out.append({
            "conv": label,
            "mean_multiplier": float(g["multiplier"].mean()),
            "paper_max_abs_units": float(g["paper_units"].abs().max()),
            "moments_max_abs_units": float(g["moments_units"].abs().max()),
            "exact_max_abs_units": float(g["exact_units"].abs().max()) if g["exact_units"].notna().any() else math.nan,
            "mean_change_vs_none": float(g["change_vs_none"].mean()),
            "hurts": ", ".join(f"{p} L={L}" for p, L in zip(g["pattern"][hurts], g["span"][hurts], strict=True)) or "-",
            "helps": ", ".join(f"{p} L={L}" for p, L in zip(g["pattern"][helps], g["span"][helps], strict=True)) or "-",
        })
    return pd.DataFrame(out)


def plot(df: pd.DataFrame):
    """Row 1: P(hit) against L per pattern, MC with intervals and the three predictions (for the
    unconvolved and the widest convolutions). Row 2: measured multiplier Δμ_eff/μ and m against L."""
    check_table(df, NAME, "plot", _PLOT_COLUMNS)
    import matplotlib.pyplot as plt
    import matplotlib.ticker as mticker
    from matplotlib.lines import Line2D

    patterns = list(dict.fromkeys(df["pattern"]))
    convs = list(dict.fromkeys(df["conv"]))
    fig, axes = plt.subplots(2, len(patterns), figsize=(6.0 * len(patterns), 10), squeeze=False)
    colors = dict(zip(convs, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    offsets = {cv: (i - (len(convs) - 1) / 2) * 0.045 for i, cv in enumerate(convs)}
    r0 = df.iloc[0]
    for col, pattern in enumerate(patterns):
        g = df[df["pattern"] == pattern]
        ax = axes[0, col]
        for cv in convs:
            h = g[g["conv"] == cv].sort_values("span")
            x = h["span"].to_numpy(float) * 2 ** offsets[cv]
            y = h["estimate"].to_numpy(float)
            err = np.vstack([y - h["ci_low"], h["ci_high"] - y])
            ax.errorbar(x, y, yerr=err, marker="s", ms=5, capsize=3, ls="none", color=colors[cv], label=cv)
            ax.plot(h["span"], h["paper_prediction"], ls=":", color=colors[cv], lw=1.3)
            pred = "exact_prediction" if h["exact_prediction"].notna().all() else "moments_prediction"
            ax.plot(h["span"], h[pred], ls="-", color=colors[cv], lw=1.0, alpha=0.8)
        ax.set_xscale("log", base=2)
        spans = sorted(set(g["span"]))
        ax.set_xticks(spans)
        ax.set_xticklabels([str(s) for s in spans])
        ax.minorticks_off()
        ax.set_xlabel("relevant tokens L (span length or scattered count)")
        ax.set_ylabel("P(hit): needle block in top-k")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.set_title(f"{pattern}: " + {"inside": "span inside the block",
                                       "cut": "span cut by the block's end (half in the next block)",
                                       "scattered": "tokens spread B/L apart in the block"}[pattern], fontsize=10)
        ax = axes[1, col]
        for cv in convs:
            h = g[g["conv"] == cv].sort_values("span")
            ax.plot(h["span"], h["multiplier"], marker="o", color=colors[cv], label=cv)
            ax.plot(h["span"], h["moments_snr"] / (r0["mu"] * math.sqrt(r0["head_dim"] / (2 * r0["block_size"]))),
                    marker="x", ls="--", color=colors[cv], alpha=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.yaxis.set_major_formatter(mticker.FormatStrFormatter("%g"))
        ax.set_xticks(spans)
        ax.set_xticklabels([str(s) for s in spans])
        ax.minorticks_off()
        ax.set_xlabel("relevant tokens L")
        ax.set_ylabel("gain over one unconvolved needle (log scale)")
        ax.set_title("measured multiplier Δμ_eff/μ from cosines (o, solid)\n"
                     "vs the router's actual SNR gain from block-score moments (x, dashed)", fontsize=10)
        ax.grid(alpha=0.3, which="both")
    handles = [Line2D([], [], color=colors[cv], marker="s", ls="none", label=f"{cv}: MC (95% CI)") for cv in convs]
    handles += [Line2D([], [], color="0.3", ls=":", label="paper: clustering multiplier at measured Δμ_eff"),
                Line2D([], [], color="0.3", ls="-", label="exact linear model (moments for SiLU)")]
    fig.legend(handles=handles, loc="lower center", ncol=4, frameon=False, fontsize=9, bbox_to_anchor=(0.5, -0.01))
    fig.suptitle(f"key-conv: does a key convolution raise Δμ_eff?  d = {r0['head_dim']}, B = {r0['block_size']}, "
                 f"n = {r0['n_blocks']}, k = {r0['top_k']}, relevant cosine μ = {r0['mu']:g}, "
                 f"{r0['trials']} trials per point", fontsize=12)
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    return fig
