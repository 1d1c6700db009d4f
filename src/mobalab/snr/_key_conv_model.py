r"""How a key convolution changes the router's signal: clustering statistics and the exact linear model.

See docs/design.md, "Clustering and key convolution".

Setting. Unit query q; noise keys uniform on :math:`S^{d-1}` (q·k: mean 0, variance 1/d); relevant keys
planted isotropically with cosine μ (q·k: mean μ, variance (1-μ²)/d), at ``offsets`` relative to the
start of the needle's block (block 0; offsets >= B fall into block 1, the next one). A *linear*
depthwise causal convolution with weights shared by all channels,

.. math:: k'_t = \sum_{\ell=0}^{W-1} w_\ell\, k_{t-\ell},

is linear in the keys, so the block score of block j (centroid = mean of its B convolved keys) is

.. math::
    s_j = \frac1B\sum_{t\in j} q\cdot k'_t = \frac1B\sum_s a_j(s)\, q\cdot k_s,\qquad
    a_j(s) = \sum_{\ell} w_\ell\,[\,s+\ell \in j\,],

where a_j(s) is the *coverage* of source token s by block j (for the averaging filter w = 1/W it is 1
for sources well inside the block, and tapers over the last W - 1 tokens, whose convolved copies spill
into the next block). The q·k_s are independent given q, hence exactly

.. math::
    \mathbb E\,s_j = \frac1B\sum_{r\in R} a_j(r)\,\mu,\qquad
    \mathrm{Var}\,s_j = \frac1{dB^2}\Big[\sum_s a_j(s)^2 - \mu^2\sum_{r\in R} a_j(r)^2\Big].

A far noise block has mean 0 and variance :math:`\frac1{dB^2}\sum_s a(s)^2`. The convolution leaves the
sum of a block's keys almost unchanged (Σ_s a_j(s) = B·Σw except at the edges): it does not add signal, it
moves it, and correlates neighbouring keys.

Clustering statistics (the paper's language). The expected cosine of a convolved key with q is, to first
order in 1/d (ratio of means; isotropic planting gives E[k_a·k_b] = μ_a μ_b, E|k|² = 1),

.. math::
    e_t = \frac{\sum_\ell w_\ell \mu_{t-\ell}}
               {\sqrt{\sum_\ell w_\ell^2 (1-\mu_{t-\ell}^2) + (\sum_\ell w_\ell \mu_{t-\ell})^2}},

with μ_s = μ for relevant sources and 0 otherwise. From the excess cosines e_t of the B positions of
the needle's block (:func:`cluster_stats`): Δμ_eff = Σ_t e_t, m = (Σ e⁺_t)² / Σ (e⁺_t)² with
e⁺ = max(e, 0) (the participation ratio: L equal excesses give m = L), and
μ_cluster - μ_noise = (Δμ_eff - e_needle)/(m - 1), so that Δμ_eff = Δμ + (m-1)(μ_cluster - μ_noise) with
Δμ = e_needle. The paper's formula then predicts
SNR = Δμ_eff·sqrt(d/2B), treating the convolved keys as independent with variance 1/d; for the averaging
filter a single needle gives W keys of cosine ≈ μ/sqrt(W), i.e. Δμ_eff ≈ μ·sqrt(W), a gain the router
never sees (the exact model above: the block sum, and so the SNR, is unchanged).

Hit probability (:func:`linear_conv_hit_probability`): the needle's block against the next block (which
holds the spilled and any cut-off relevant tokens) and n - 2 far noise blocks, all Gaussian:

.. math::
    P_{\rm hit} = \int\phi(z)\Big[(1-\pi(z))\,F_{k-1}(z) + \pi(z)\,F_{k-2}(z)\Big]dz,\quad
    F_i(z) = \mathrm{BinomCDF}\big(i;\, n-2,\ \bar\Phi(s(z)/\sigma_n)\big),\ \
    \pi(z) = \bar\Phi\Big(\frac{s(z)-m_1}{\sigma_1}\Big),

s(z) = m_0 + σ_0 z. The covariance between adjacent blocks through the W - 1 boundary sources they share
is neglected (it is exactly 0 without convolution; for the averaging filter the noise correlation of
neighbouring blocks is about W/(6B), so the model is meant for filters short against the block).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import ndtr
from scipy.stats import binom

from .._validate import check_memory, count, real, scalar_cosine, scalar_count

__all__ = ["conv_coverage", "cluster_stats", "LinearConvBlockModel", "linear_conv_block_model",
           "linear_conv_hit_probability"]


def _weights(weights) -> np.ndarray:
    w = real("weights", weights)
    if w.ndim != 1 or w.size < 1:
        raise ValueError(f"weights must be a 1-d sequence (W,) shared by all channels, got shape {w.shape}")
    return w


def _check_size(block_size: int, width: int) -> None:
    check_memory(
        f"the key-convolution model of a block of {block_size} tokens and a filter of width {width}",
        16 * 8 * (block_size + width),
        "use a smaller block_size",
    )


def conv_coverage(weights, block_size: int, block: int = 0):
    r"""Coverage :math:`a_j(s) = \sum_\ell w_\ell [s + \ell \in j]` of every source feeding block ``block``.

    .. math:: a_j(s) = \sum_{\ell=0}^{W-1} w_\ell\,[\,jB \le s + \ell < (j+1)B\,]

    Offsets are relative to the start of block 0; block j covers [jB, jB + B). Returns ``(sources,
    coverage)``: the source offsets jB - W + 1 .. jB + B - 1 and their coverage (W = len(weights)).

    Examples
    --------
    An averaging filter of width 3 on blocks of 8: the last two keys of the previous block spill in, the
    block's own last two spill out, and the block's total is kept:

    >>> import numpy as np
    >>> from mobalab import snr
    >>> sources, coverage = snr.conv_coverage(np.full(3, 1 / 3), 8)
    >>> print(sources)
    [-2 -1  0  1  2  3  4  5  6  7]
    >>> print(coverage.round(3), round(coverage.sum(), 6))
    [0.333 0.667 1.    1.    1.    1.    1.    1.    0.667 0.333] 8.0
    """
    w = _weights(weights)
    bsz = scalar_count("block_size", block_size)
    j = scalar_count("block", block, 0)
    _check_size(bsz, w.size)
    start, W = j * bsz, w.size
    sources = np.arange(start - W + 1, start + bsz)
    # Source s lands in the block through lags l in [start - s, start + B - 1 - s] ∩ [0, W - 1]:
    # a partial sum of w, read off its cumulative sums.
    cum = np.concatenate([[0.0], np.cumsum(w)])
    lo = np.clip(start - sources, 0, W)
    hi = np.clip(start + bsz - sources, 0, W)
    return sources, cum[hi] - cum[lo]


def cluster_stats(excess, needle_index: int):
    r"""(Δμ_eff, m, μ_cluster - μ_noise) from per-position excess cosines of the needle's block.

    .. math:: \Delta\mu_{\rm eff} = \sum_t e_t,\quad m = \frac{(\sum_t e^+_t)^2}{\sum_t (e^+_t)^2},\quad
              \mu_{\rm cluster} - \mu_{\rm noise} = \frac{\Delta\mu_{\rm eff} - e_{\rm needle}}{m - 1}

    Δμ_eff = Σ e_t; m = (Σ e⁺)² / Σ (e⁺)² with e⁺ = max(e, 0) (participation ratio; 1 when no position
    is elevated); μ_cluster - μ_noise = (Δμ_eff - e[needle_index]) / (m - 1), NaN when m = 1.

    Examples
    --------
    Four positions at cosine 0.5 (the needle at position 1 among them) read as m = 4 keys of μ_cluster 0.5:

    >>> from mobalab import snr
    >>> print(snr.cluster_stats([0.0, 0.5, 0.5, 0.5, 0.5, 0.0], needle_index=1))
    (2.0, 4.0, 0.5)
    """
    e = real("excess", excess)
    if e.ndim != 1 or e.size == 0:
        raise ValueError(f"excess must be a non-empty 1-d array of per-position cosines, got shape {e.shape}")
    i = scalar_count("needle_index", needle_index, 0)
    if i >= e.size:
        raise ValueError(f"needle_index {i} is outside the block of {e.size} positions")
    total = float(e.sum())
    pos = np.clip(e, 0.0, None)
    sq = float((pos**2).sum())
    m = float(pos.sum() ** 2 / sq) if sq > 0 else 1.0
    m = max(m, 1.0)
    cluster = (total - float(e[i])) / (m - 1.0) if m > 1.0 + 1e-12 else float("nan")
    return total, m, cluster


@dataclass(frozen=True)
class LinearConvBlockModel:
    r"""Exact block-score moments under a linear key convolution (module docstring), scores per token.

    .. math:: \mathrm{snr} = \frac{\mathbb E s_0}{\sqrt{\mathrm{Var}\,s_0 + \mathrm{Var}\,s_{\rm far}}},\qquad
              \text{sd\_ratio} = \sqrt{\mathrm{Var}\,s_0 / \mathrm{Var}\,s_{\rm far}}

    mean_signal / var_signal: the needle's block; mean_next / var_next: the block after it; var_noise: a
    far noise block. snr = mean_signal / sqrt(var_signal + var_noise) and sd_ratio = sqrt(var_signal /
    var_noise) are against a far noise block. excess_cosines: e_t for the B positions of the needle's block;
    delta_mu_eff, m, mu_cluster: :func:`cluster_stats` of them; paper_snr = delta_mu_eff·sqrt(d / 2B).

    Examples
    --------
    >>> from mobalab import snr
    >>> model = snr.linear_conv_block_model(64, 32, [0.25] * 4, [10], 0.5)
    >>> print(f"snr {model.snr:.3f}, paper's reading: m {model.m:.1f}, delta_mu_eff {model.delta_mu_eff:.2f}")
    snr 0.511, paper's reading: m 4.0, delta_mu_eff 1.00
    """

    mean_signal: float
    var_signal: float
    mean_next: float
    var_next: float
    var_noise: float
    snr: float
    sd_ratio: float
    excess_cosines: np.ndarray
    delta_mu_eff: float
    m: float
    mu_cluster: float
    paper_snr: float


def _block_moments(w, bsz, d, rel: np.ndarray, mu, block):
    sources, a = conv_coverage(w, bsz, block)
    is_rel = np.isin(sources, rel)
    mean = float((a * is_rel).sum() * mu) / bsz
    var = float((a**2).sum() - mu * mu * (a[is_rel] ** 2).sum()) / (d * bsz * bsz)
    return mean, var


def linear_conv_block_model(head_dim: int, block_size: int, weights, offsets, mu: float, needle_offset=None):
    r"""Moments and clustering statistics of a span / scatter of relevant tokens under a linear convolution.

    .. math::
        \mathbb E\,s_j = \frac{\mu}{B}\sum_{r\in R} a_j(r),\qquad
        \mathrm{Var}\,s_j = \frac1{dB^2}\Big[\sum_s a_j(s)^2 - \mu^2\sum_{r\in R} a_j(r)^2\Big]

    for the needle's block (j = 0), the next (j = 1) and a far noise block (no relevant source), and the
    excess cosine of each position t of the needle's block, read by :func:`cluster_stats`:

    .. math::
        e_t = \frac{\sum_\ell w_\ell \mu_{t-\ell}}
                   {\sqrt{\sum_\ell w_\ell^2 (1-\mu_{t-\ell}^2) + (\sum_\ell w_\ell \mu_{t-\ell})^2}}.

    ``weights``: (W,) shared by all channels (W = 1, w = [1] is no convolution); ``offsets``: distinct
    integer positions of the relevant tokens relative to the needle block's start, each in [0, 2B) (the
    needle's block and the next) and with offset + W - 1 < 2B (no convolved copy in a third block);
    ``mu``: their cosine with q (|μ| <= 1); ``needle_offset``: the needle (default: the smallest offset),
    which must lie in [0, B). Equations: module docstring.

    Examples
    --------
    Averaging a single needle over W = 4 keys makes the paper's statistics see a cluster (m = 4, Δμ_eff
    doubled from 0.5 to 1.0), but the router's SNR barely moves (0.501 to 0.511, from the taper of the
    noise at the block's edges):

    >>> from mobalab import snr
    >>> plain = snr.linear_conv_block_model(64, 32, [1.0], [10], 0.5)
    >>> averaged = snr.linear_conv_block_model(64, 32, [0.25] * 4, [10], 0.5)
    >>> print(f"{plain.snr:.3f} {averaged.snr:.3f} | {plain.delta_mu_eff:.2f} {averaged.delta_mu_eff:.2f}")
    0.501 0.511 | 0.50 1.00
    """
    d = scalar_count("head_dim", head_dim)
    bsz = scalar_count("block_size", block_size)
    w = _weights(weights)
    mu = scalar_cosine("mu", mu)
    offs = count("offsets", offsets, 0)
    if offs.ndim != 1 or offs.size == 0:
        raise ValueError(f"offsets must be a non-empty 1-d sequence of integers, got {offsets!r}")
    if np.unique(offs).size != offs.size or offs.max() >= 2 * bsz:
        raise ValueError(f"offsets must be distinct integers in [0, 2B = {2 * bsz}), got {offs.tolist()}")
    needle = int(offs.min()) if needle_offset is None else scalar_count("needle_offset", needle_offset, 0)
    if needle >= bsz or needle not in offs:
        raise ValueError(f"needle_offset must be one of the offsets inside block 0 [0, {bsz}), got {needle}")
    if not np.any(w):
        raise ValueError(f"weights must not all be zero (every convolved key would be 0, no block could be told "
                         f"from another), got {w.tolist()}")
    reach = int(offs.max()) + w.size - 1
    if reach >= 2 * bsz:
        raise ValueError(
            f"the relevant token at offset {int(offs.max())} is convolved into position {reach}, in the block after "
            f"the next (positions >= 2B = {2 * bsz}); the model scores only the needle's block and the next against "
            f"noise blocks: keep every offset + W - 1 < 2B (W = {w.size})"
        )
    _check_size(bsz, w.size)
    m0, v0 = _block_moments(w, bsz, d, offs, mu, 0)
    m1, v1 = _block_moments(w, bsz, d, offs, mu, 1)
    _, a_far = conv_coverage(w, bsz, 0)
    vn = float((a_far**2).sum()) / (d * bsz * bsz)

    # Cosines of the sources feeding the needle's block (offsets -W+1 .. B-1), then the numerator and the
    # squared norm of e_t as 'valid' convolutions: Σ_l w_l μ_{t-l} and Σ_l w_l² (1 - μ_{t-l}²).
    mu_src = np.where(np.isin(np.arange(-w.size + 1, bsz), offs), mu, 0.0)
    num = np.convolve(mu_src, w, mode="valid")
    sq = np.convolve(1.0 - mu_src**2, w**2, mode="valid")
    excess = num / np.sqrt(sq + num**2)
    dmu, m, cluster = cluster_stats(excess, needle)
    return LinearConvBlockModel(
        mean_signal=m0, var_signal=v0, mean_next=m1, var_next=v1, var_noise=vn,
        snr=float(m0 / np.sqrt(v0 + vn)), sd_ratio=float(np.sqrt(v0 / vn)), excess_cosines=excess,
        delta_mu_eff=dmu, m=m, mu_cluster=cluster, paper_snr=float(dmu * np.sqrt(d / (2.0 * bsz))),
    )


_Z = np.linspace(-9.0, 9.0, 3601)
_PHI = np.exp(-0.5 * _Z**2) / np.sqrt(2.0 * np.pi)


def _above(s: np.ndarray, mean: float, var: float) -> np.ndarray:
    """P(a block score N(mean, var) lies above s); a score without variance (|μ| = 1 on every source it
    covers) is the constant ``mean``, which wins a tie, as the later block does (ties go to the higher index)."""
    if var > 0.0:
        return ndtr((mean - s) / np.sqrt(var))
    return (mean >= s).astype(np.float64)


def linear_conv_hit_probability(model: LinearConvBlockModel, n_blocks: int, top_k: int) -> float:
    r"""P(needle block in the top k of n): needle block vs the next block and n - 2 far noise blocks.

    .. math::
        P_{\rm hit} = \int\phi(z)\Big[(1-\pi(z))\,F_{k-1}(z) + \pi(z)\,F_{k-2}(z)\Big]dz,\quad
        F_i(z) = \mathrm{BinomCDF}\big(i;\, n-2,\ \bar\Phi(s(z)/\sigma_n)\big),\ \
        \pi(z) = \bar\Phi\Big(\frac{s(z)-m_1}{\sigma_1}\Big),\ \ s(z) = m_0 + \sigma_0 z

    Gaussian scores with the moments of ``model``; integral of the module docstring (trapezoid rule on
    z in [-9, 9], 3601 points). ``n_blocks >= 2``; ``top_k >= n_blocks`` gives 1.

    Examples
    --------
    >>> from mobalab import snr
    >>> span = snr.linear_conv_block_model(64, 32, [1.0], [10, 11, 12, 13], 0.5)
    >>> print(f"{snr.linear_conv_hit_probability(span, n_blocks=64, top_k=4):.3f}")
    0.890
    """
    if not isinstance(model, LinearConvBlockModel):
        raise TypeError(f"model must be a LinearConvBlockModel, got {type(model).__name__}")
    n = scalar_count("n_blocks", n_blocks, 2)
    k = scalar_count("top_k", top_k)
    if k >= n:
        return 1.0
    s = model.mean_signal + np.sqrt(model.var_signal) * _Z
    qbar = _above(s, 0.0, model.var_noise)
    pi = _above(s, model.mean_next, model.var_next)
    f1 = binom.cdf(k - 1, n - 2, qbar)
    f2 = binom.cdf(k - 2, n - 2, qbar) if k >= 2 else np.zeros_like(qbar)
    return float(np.clip(np.trapezoid(_PHI * ((1.0 - pi) * f1 + pi * f2), _Z), 0.0, 1.0))
