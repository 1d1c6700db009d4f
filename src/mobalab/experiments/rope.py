r"""rope: does ignoring RoPE mislead the routing design? The Dirichlet low-pass of a span against Monte Carlo.

MoBA routes on post-RoPE queries and keys. A block centroid sums a span of m relevant tokens at m
different rotations: per frequency pair i only the fraction F_i, |F_i| <= D_m(θ_i) =
|sin(mθ_i/2)| / (m |sin(θ_i/2)|), of their signal survives (:func:`mobalab.snr.rope_block_model`), so the paper's
clustering multiplier 1 + (m-1)ρ overstates Δμ_eff wherever m·θ_i is not small.

Model (needle-anchored, :func:`mobalab.snr.rope_block_model` with needle_lag = 0): the query is planted to
match the needle at its relative offset (post-RoPE cosine μ); the m - 1 other span tokens carry the same
content at the neighbouring positions (pre-RoPE cosine μ to it), the span lies inside one block, the
needle is its ``needle_at`` token ("centre": index (m-1)//2, "start": index 0). Non-causal top-k over
n = ``n_blocks`` blocks, context N = n·B.

Sweeps (``sweep`` column), one parameter at a time around the centre (``head_dim``, ``block_size``, ``m``,
``base``): span length m, block size B (m = min(m, B)), head dim d, RoPE base. At every point the cosine
μ (needle and span alike) is chosen so that the *RoPE-blind* theory (:func:`mobalab.snr.generator_block_model`:
Δμ_eff = m·μ) predicts P(hit) = ``design_target``: what a designer who ignores RoPE expects (μ capped at
``max_mu``; ``mu_capped`` marks where the target is out of reach, e.g. m = 1). Then:

* ``rope_prediction``: P(hit) from the RoPE-aware moments (:func:`mobalab.snr.rope_block_model`) through
  :func:`mobalab.snr.hit_probability`; ``blind_prediction``: the same without RoPE (= the target);
* ``vector-level-rope`` rows: :func:`mobalab.simulate.rope_vector_router` (pre-RoPE vectors, rotated by
  position, exact MoBA routing), on CUDA when present (``device``);
* ``kernel`` rows: :func:`mobalab.kernels.moba_topk`, non-causal, on RoPE'd inputs laid out as (batch, N,
  heads, d): the pre-RoPE query in every row of its sequence, every row and key rotated by its position
  (:func:`mobalab.simulate.apply_rope`) before routing, as models do; row N-1 is read. With a usable GPU
  the CUDA kernel in fp16 (``backend`` "cuda-kernel"; it supports head dims 32, 64, 96, 128 and 256, so the d = 16 point
  gets no kernel row), otherwise the torch reference in fp32 (``backend`` "torch-reference") for N <=
  ``kernel_cpu_max_seq_len``.

Every Monte Carlo row carries a 95% Wilson interval and ``rope_units`` / ``blind_units``: the distance of
each prediction from the estimate in interval units (:func:`mobalab.stats.interval_units`; |u| <= 1:
inside). :func:`verdict` says in one line where ignoring RoPE misleads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.optimize import brentq
from tqdm.auto import tqdm

from mobalab import simulate, snr
from mobalab.stats import interval_units, wilson_interval

from ._checks import check_seed
from ._columns import check_table, integer_columns
from ._devices import kernel_backend, resolve_device

__all__ = ["Config", "run", "plot", "summary", "plan", "verdict", "design_point", "kernel_hits"]

NAME = "rope"

#: columns of the tidy table that plot and summary read (check_table names the missing ones)
_PLOT_COLUMNS = ("backend", "blind_prediction", "blind_units", "block_size", "ci_high", "ci_low", "estimate",
                 "head_dim", "m", "method", "n_blocks", "needle_index", "point", "rope_base", "rope_prediction",
                 "rope_units", "sweep", "top_k", "value")
_SUMMARY_COLUMNS = ("blind_multiplier", "blind_prediction", "blind_units", "block_size", "estimate", "head_dim", "m",
                    "method", "mu", "point", "rope_base", "rope_multiplier", "rope_prediction", "rope_units", "sweep",
                    "value")
SWEEPS = ("span m", "block size B", "head dim d", "RoPE base")
NEEDLE_AT = ("centre", "start")


@dataclass(frozen=True)
class Config:
    """What to sweep: one parameter at a time around (head_dim, block_size, m, base)."""

    head_dim: int = 64
    block_size: int = 64
    m: int = 16
    base: float = 10000.0
    span_lengths: tuple[int, ...] = (1, 4, 16, 32, 64)
    block_sizes: tuple[int, ...] = (16, 32, 64, 128)
    head_dims: tuple[int, ...] = (16, 32, 64, 128)
    bases: tuple[float, ...] = (100.0, 500.0, 10000.0, 500000.0)
    n_blocks: int = 16
    top_k: int = 2
    needle_at: str = "centre"
    design_target: float = 0.9
    max_mu: float = 1.0
    trials: int = 4000
    device: str = "auto"  # vector leg: "auto" (CUDA when present), "cpu" or a torch device string
    kernel: bool = True
    kernel_device: str = "auto"  # "auto" (CUDA kernel when a GPU is usable), "cpu" (torch reference), "cuda"
    kernel_trials: int = 4096  # per point on the GPU
    kernel_cpu_trials: int = 512  # per point on the CPU reference
    kernel_cpu_max_seq_len: int = 2048
    kernel_heads: int = 16
    seed: int = 0

    @classmethod
    def quick(cls, **overrides) -> Config:
        """A CPU run that finishes in well under a minute."""
        base = dict(span_lengths=(1, 16, 64), block_sizes=(16, 64), head_dims=(32, 64), bases=(500.0, 10000.0),
                    trials=600, kernel_cpu_trials=96, kernel_trials=1024)
        base.update(overrides)
        return cls(**base)


def _check(c: Config) -> None:
    check_seed(c.seed)
    if c.needle_at not in NEEDLE_AT:
        raise ValueError(f"needle_at must be one of {NEEDLE_AT}, got {c.needle_at!r}")
    if not 0.0 < c.design_target < 1.0:
        raise ValueError(f"design_target must lie strictly between 0 and 1, got {c.design_target}")
    if not 0.0 < c.max_mu <= 1.0:
        raise ValueError(f"max_mu (a cosine) must lie in (0, 1], got {c.max_mu}")
    if c.n_blocks < 2 or not 1 <= c.top_k < c.n_blocks:
        raise ValueError(f"need n_blocks >= 2 and 1 <= top_k < n_blocks, got n_blocks={c.n_blocks}, "
                         f"top_k={c.top_k}")
    if c.design_target <= c.top_k / c.n_blocks:
        # with no signal the needle's block is still picked with probability k/n: no cosine designs for less
        raise ValueError(f"design_target must exceed chance, top_k / n_blocks = {c.top_k}/{c.n_blocks} = "
                         f"{c.top_k / c.n_blocks:g}, got {c.design_target}")
    if c.m > c.block_size:
        raise ValueError(f"the centre span m = {c.m} does not fit in the centre block_size = {c.block_size}")
    if any(m > c.block_size for m in c.span_lengths):
        raise ValueError(f"span_lengths {c.span_lengths} must not exceed block_size = {c.block_size}")


def _needle_index(m: int, needle_at: str) -> int:
    return (m - 1) // 2 if needle_at == "centre" else 0


def _points(c: Config) -> list[tuple[str, float, tuple[int, int, int, float]]]:
    """(sweep, swept value, (d, B, m, base)) for every sweep point; the centre recurs in each sweep."""
    out = [("span m", m, (c.head_dim, c.block_size, m, c.base)) for m in c.span_lengths]
    out += [("block size B", b, (c.head_dim, b, min(c.m, b), c.base)) for b in c.block_sizes]
    out += [("head dim d", d, (d, c.block_size, c.m, c.base)) for d in c.head_dims]
    out += [("RoPE base", base, (c.head_dim, c.block_size, c.m, base)) for base in c.bases]
    return out


def design_point(head_dim: int, block_size: int, m: int, base: float, n_blocks: int, top_k: int,
                 design_target: float, needle_index: int, max_mu: float = 1.0):
    r"""The cosine μ at which the RoPE-blind theory predicts P(hit) = ``design_target``, and the RoPE model there.

    Needle and span share μ (Δμ_eff = m·μ without RoPE). Solves
    :math:`P_{\rm hit}(\mathrm{SNR}_{\rm blind}(\mu); n, k) = ` ``design_target`` for μ in (0, ``max_mu``]
    (the blind SNR grows with μ); where even ``max_mu`` falls short μ = ``max_mu``. Returns
    ``(mu, capped, model)`` with ``model`` the :class:`mobalab.snr.RopeBlockModel` at μ.
    """
    def model(mu):
        return snr.rope_block_model(head_dim, block_size, mu, m=m, mu_cluster=mu, base=base,
                                    needle_index=needle_index)

    def gap(mu):
        mod = model(mu)
        return snr.hit_probability(mod.blind_snr, n_blocks, top_k, sd_ratio=mod.blind_sd_ratio) - design_target

    if gap(max_mu) <= 0:
        return max_mu, True, model(max_mu)
    mu = brentq(gap, 1e-9, max_mu, xtol=1e-12)
    return mu, False, model(mu)


def kernel_hits(head_dim: int, block_size: int, m: int, base: float, n_blocks: int, top_k: int, mu: float,
                needle_index: int, trials: int, seed, device, dtype, heads: int = 16,
                max_elements: int = 1 << 24):
    """Hits of ``moba_topk`` (non-causal) on RoPE'd planted-span sequences; returns (hits, trials).

    Each trial is one (batch row, head) of a (batch, N = n·B, heads, d) call, drawn as
    :func:`mobalab.simulate.rope_vector_router` draws it (span uniform in a uniform block, content matched
    to the query at the needle's offset from the query row t = N - 1). The pre-RoPE query fills every row
    of its sequence; rows and keys are rotated by their positions (:func:`mobalab.simulate.apply_rope`),
    then cast to ``dtype`` and routed. A hit: the needle's block among row t's selected blocks. Calls hold
    at most ``max_elements`` key elements; the trial count is rounded up to whole calls.
    """
    import torch

    from mobalab.kernels import moba_topk

    seq_len = n_blocks * block_size
    per_call = max(1, max_elements // (seq_len * head_dim))
    h = max(1, min(heads, trials, per_call))
    b = max(1, min(math.ceil(trials / h), per_call // h))
    calls = math.ceil(trials / (b * h))
    rng = np.random.default_rng(seed)
    positions = torch.arange(seq_len, device=device)
    hits = done = 0
    for _ in range(calls):
        gen = torch.Generator(device=device).manual_seed(int(rng.integers(2**62)))
        count = b * h
        needle = simulate.random_span_positions(rng, count, seq_len, block_size, m, needle_index)
        t = np.full(count, seq_len - 1)
        q = simulate.random_unit_vectors(gen, (count,), head_dim)
        keys = simulate.random_unit_vectors(gen, (count, seq_len), head_dim)
        simulate.plant_rope_span(gen, q, keys, t, needle, m, mu, mu, needle_index=needle_index, base=base)
        q_rows = simulate.apply_rope(q[:, None, :].expand(count, seq_len, head_dim), positions, base)
        keys = simulate.apply_rope(keys, positions, base)
        k4 = keys.view(b, h, seq_len, head_dim).permute(0, 2, 1, 3).to(dtype).contiguous()
        q4 = q_rows.view(b, h, seq_len, head_dim).permute(0, 2, 1, 3).to(dtype).contiguous()
        with torch.no_grad():
            sel = moba_topk(q4, k4, block_size, top_k, causal=False)[:, seq_len - 1]  # (b, h, top_k)
        target = torch.as_tensor(needle // block_size, device=device).view(b, h, 1)
        hits += int((sel == target).any(-1).sum())
        done += count
    return hits, done


def _distinct(c: Config) -> list[tuple[int, int, int, float]]:
    """The distinct (d, B, m, base) of the sweeps: each is simulated once, however many sweeps it lies on."""
    return list(dict.fromkeys(p for _, _, p in _points(c)))


def plan(config: Config = Config()) -> str:
    """What :func:`run` will do, said before it starts (the CLI prints it): points, device and trials of each leg.

    Examples
    --------
    >>> from mobalab.experiments.rope import Config, plan
    >>> print(plan(Config.quick(device="cpu", kernel_device="cpu")))  # doctest: +ELLIPSIS +NORMALIZE_WHITESPACE
    6 distinct points (9 along the sweeps); vector-level Monte Carlo on cpu: 600 trials per point; kernel leg:
    torch-reference on cpu (...), float32, 96 trials per point at the 6 points with N <= 2048
    """
    c = config
    _check(c)
    unique = _distinct(c)
    text = (f"{len(unique)} distinct points ({len(_points(c))} along the sweeps); vector-level Monte Carlo on "
            f"{resolve_device(c.device)}: {c.trials} trials per point")
    if not c.kernel:
        return text + "; kernel leg off"
    _, name, device_name, dtype = kernel_backend(c.kernel_device)
    dtype = str(dtype).removeprefix("torch.")
    if name == "cuda-kernel":
        return text + (f"; kernel leg: {name} on {device_name}, {dtype}, {c.kernel_trials} trials per point whose "
                       "head dim the kernel takes (32, 64, 96, 128, 256)")
    cpu = sum(n * c.n_blocks <= c.kernel_cpu_max_seq_len for _, n, _, _ in unique)
    return text + (f"; kernel leg: {name} on {device_name}, {dtype}, {c.kernel_cpu_trials} trials per point at the "
                   f"{cpu} points with N <= {c.kernel_cpu_max_seq_len}")


def run(config: Config = Config(), progress: bool = False) -> pd.DataFrame:
    """One row per (sweep point, Monte Carlo leg) with both predictions and their interval units; ``run_seed``
    is the config's seed, from which every leg's stream is spawned."""
    c = config
    _check(c)
    device = resolve_device(c.device)
    backend = kernel_backend(c.kernel_device) if c.kernel else None
    points = _points(c)
    unique = _distinct(c)
    seeds = np.random.SeedSequence(c.seed).spawn(2 * len(unique))
    bar = tqdm(total=len(unique), desc=NAME, disable=not progress, unit="point")
    legs: dict[tuple, list[dict]] = {}
    for i, (d, B, m, base) in enumerate(unique):
        a = _needle_index(m, c.needle_at)
        mu, capped, mod = design_point(d, B, m, base, c.n_blocks, c.top_k, c.design_target, a, c.max_mu)
        n, k, N = c.n_blocks, c.top_k, c.n_blocks * B
        common = dict(point=i, head_dim=d, block_size=B, m=m, needle_index=a, rope_base=base, n_blocks=n,
                      top_k=k, seq_len=N, mu=mu, mu_capped=capped, blind_multiplier=mod.blind_multiplier,
                      rope_multiplier=mod.multiplier, blind_delta_mu_eff=mod.blind_delta_mu_eff,
                      rope_delta_mu_eff=mod.delta_mu_eff, var_phase=mod.var_phase, blind_snr=mod.blind_snr,
                      rope_snr=mod.snr, sd_ratio=mod.sd_ratio,
                      blind_prediction=float(snr.hit_probability(mod.blind_snr, n, k, sd_ratio=mod.blind_sd_ratio)),
                      rope_prediction=float(snr.hit_probability(mod.snr, n, k, sd_ratio=mod.sd_ratio)))
        rows = []
        vec = simulate.rope_vector_router(d, N, B, k, mu, m=m, mu_cluster=mu, base=base, needle_index=a,
                                          trials=c.trials, seed=int(seeds[2 * i].generate_state(1)[0]),
                                          device=device)
        v = vec.iloc[0]
        rows.append(dict(common, method="vector-level-rope", backend=v["backend"], device=str(device),
                         hits=int(v["hits"]), trials=int(v["trials"])))
        if backend is not None:
            kdev, kname, kdevice_name, kdtype = backend
            on_gpu = kname == "cuda-kernel"
            if on_gpu or N <= c.kernel_cpu_max_seq_len:
                try:
                    hits, done = kernel_hits(d, B, m, base, n, k, mu, a, c.kernel_trials if on_gpu
                                             else c.kernel_cpu_trials, seeds[2 * i + 1], kdev, kdtype,
                                             c.kernel_heads, 1 << (28 if on_gpu else 24))
                    rows.append(dict(common, method="kernel", backend=kname, device=kdevice_name, hits=hits,
                                     trials=done))
                except ValueError:
                    # The CUDA kernel refuses head dims it was not built for: that point has no kernel row.
                    # The CPU reference accepts every shape, so there an error is a real one.
                    if not on_gpu:
                        raise
        legs[(d, B, m, base)] = rows
        bar.update(1)
    bar.close()
    out = [dict(r, sweep=s, value=float(val)) for s, val, p in points for r in legs[p]]
    df = pd.DataFrame(out)
    df["estimate"] = df["hits"] / df["trials"]
    lo, hi = wilson_interval(df["hits"].to_numpy(), df["trials"].to_numpy())
    df["ci_low"], df["ci_high"] = lo, hi
    for kind in ("rope", "blind"):
        df[f"{kind}_units"] = interval_units(df[f"{kind}_prediction"], df["hits"], df["trials"])
    df.insert(0, "experiment", NAME)
    df.insert(1, "run_seed", c.seed)
    first = ["experiment", "run_seed", "sweep", "value", "method", "backend", "device", "estimate", "ci_low", "ci_high",
             "rope_prediction", "blind_prediction", "rope_units", "blind_units"]
    return integer_columns(df[first + [col for col in df.columns if col not in first]], ("run_seed",))


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per sweep point: the design, both predictions, each leg's estimate and its distance in interval units.

    ``attrs["verdict"]`` holds :func:`verdict`.
    """
    check_table(df, NAME, "summary", _SUMMARY_COLUMNS)
    keys = ["sweep", "value"]
    base = (df.groupby(keys, sort=False)
              .agg(m=("m", "first"), B=("block_size", "first"), d=("head_dim", "first"), base=("rope_base", "first"),
                   mu=("mu", "first"), mult_blind=("blind_multiplier", "first"), mult_rope=("rope_multiplier", "first"),
                   blind_pred=("blind_prediction", "first"), rope_pred=("rope_prediction", "first"))
              .reset_index())
    for method, tag in (("vector-level-rope", "mc"), ("kernel", "kernel")):
        part = df[df["method"] == method].set_index(keys)
        if part.empty:
            continue
        cols = part[["estimate", "rope_units", "blind_units"]].rename(
            columns={"estimate": tag, "rope_units": f"{tag}_rope_u", "blind_units": f"{tag}_blind_u"})
        base = base.join(cols, on=keys)
    base.attrs["verdict"] = verdict(df)
    return base


def _values(df: pd.DataFrame, mask) -> str:
    parts = []
    for sweep, label in zip(SWEEPS, ("m", "B", "d", "base"), strict=True):
        vals = sorted(set(df.loc[mask & (df["sweep"] == sweep), "value"]))
        if vals:
            parts.append(f"{label} in {{{', '.join(f'{v:g}' for v in vals)}}}")
    return "; ".join(parts) or "nowhere"


def verdict(df: pd.DataFrame) -> str:
    """One line: how often RoPE-aware theory sits inside the 95% interval, and where the RoPE-blind one misses."""
    legs = df.drop_duplicates(["point", "method"])
    inside = int((legs["rope_units"].abs() <= 1).sum())
    worst = legs.loc[legs["blind_units"].abs().idxmax()]
    gap = legs["blind_prediction"] - legs["estimate"]
    big = df["blind_units"].abs() > 3
    return (f"RoPE-aware theory inside the 95% interval at {inside}/{len(legs)} Monte Carlo points "
            f"(max |u| {legs['rope_units'].abs().max():.1f}); the RoPE-blind theory overstates P(hit) by up to "
            f"{gap.max():.2f} ({abs(worst['blind_units']):.0f} interval units at m={int(worst['m'])}, "
            f"B={int(worst['block_size'])}, d={int(worst['head_dim'])}, base={worst['rope_base']:g}) and misses "
            f"by > 3 units at {_values(df, big)}.")


def plot(df: pd.DataFrame):
    """Top: P(hit) along each sweep (blind and RoPE-aware theory, Monte Carlo and kernel with 95% intervals).
    Bottom: the per-pair factors F_i of the sweep's points against the pair index i/(d/2), with the
    Dirichlet envelope D_m(θ_i)."""
    check_table(df, NAME, "plot", _PLOT_COLUMNS)
    import matplotlib.pyplot as plt

    sweeps = [s for s in SWEEPS if (df["sweep"] == s).any()]
    fig, axes = plt.subplots(2, len(sweeps), figsize=(4.6 * len(sweeps), 8.2), squeeze=False)
    styles = {"vector-level-rope": dict(marker="s", color="tab:green", mfc="none", ms=6),
              "kernel": dict(marker="^", color="tab:red", ms=6)}
    for j, sweep in enumerate(sweeps):
        d = df[df["sweep"] == sweep]
        ax = axes[0, j]
        theory = d.drop_duplicates("value").sort_values("value")
        ax.plot(theory["value"], theory["blind_prediction"], "--", color="0.45", lw=1.6,
                label="theory ignoring RoPE (design target)")
        ax.plot(theory["value"], theory["rope_prediction"], "-o", color="tab:blue", lw=2, ms=3,
                label="RoPE-aware theory")
        for method, st in styles.items():
            pts = d[d["method"] == method].sort_values("value")
            if pts.empty:
                continue
            err = np.vstack([pts["estimate"] - pts["ci_low"], pts["ci_high"] - pts["estimate"]])
            label = ("vector-level MC, RoPE'd (95% CI)" if method != "kernel"
                     else f"moba_topk on RoPE'd inputs, {pts['backend'].iloc[0]} (95% CI)")
            ax.errorbar(pts["value"], pts["estimate"], yerr=err, ls="none", capsize=3, label=label, **st)
        ax.set_xscale("log", base=2 if sweep != "RoPE base" else 10)
        ax.set_xlabel(sweep)
        ax.set_ylabel("P(hit): needle block in top-k")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        centre = d.iloc[0]
        others = {"span m": f"B={centre['block_size']}, d={centre['head_dim']}, base={centre['rope_base']:g}",
                  "block size B": f"m=min({d['m'].max()}, B), d={centre['head_dim']}, base={centre['rope_base']:g}",
                  "head dim d": f"m={centre['m']}, B={centre['block_size']}, base={centre['rope_base']:g}",
                  "RoPE base": f"m={centre['m']}, B={centre['block_size']}, d={centre['head_dim']}"}[sweep]
        ax.set_title(f"{sweep}  ({others}; n={centre['n_blocks']}, k={centre['top_k']})", fontsize=9)

        ax2 = axes[1, j]
        cmap = plt.get_cmap("viridis")
        for idx, (_, p) in enumerate(theory.iterrows()):
            dd, m, base_, a = int(p["head_dim"]), int(p["m"]), float(p["rope_base"]), int(p["needle_index"])
            theta = snr.rope_frequencies(dd, base_)
            frac = (np.arange(theta.size) + 0.5) / theta.size
            color = cmap(idx / max(len(theory) - 1, 1))
            ax2.plot(frac, snr.rope_pair_factors(dd, m, base_, needle_index=a), "-", color=color, lw=1.5,
                     label=f"{sweep.split()[-1]} = {p['value']:g}")
            ax2.plot(frac, snr.dirichlet_factor(m, theta), ":", color=color, lw=1)
        ax2.axhline(0, color="0.6", lw=0.8)
        ax2.set_xlabel(r"pair $i\,/\,(d/2)$: fast (left) to slow, $\theta_i = \mathrm{base}^{-2i/d}$")
        ax2.set_ylabel(r"per-pair factor $F_i$ (dotted: $D_m(\theta_i)$)")
        ax2.set_ylim(-0.35, 1.05)
        ax2.grid(alpha=0.3)
        ax2.legend(fontsize=7, loc="lower right")
    handles, labels = {}, []
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(lab, h)
    labels = list(handles)
    fig.legend([handles[lab] for lab in labels], labels, loc="lower center", ncol=min(len(labels), 4),
               frameon=False, bbox_to_anchor=(0.5, -0.01))
    text = verdict(df)
    fig.suptitle("MoBA routing with RoPE: a span's centroid keeps only its low-frequency pairs\n"
                 + "\n".join(_wrap(text, 170)), fontsize=9.5, y=1.0)
    fig.tight_layout(rect=(0, 0.04, 1, 0.96))
    return fig


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width)
