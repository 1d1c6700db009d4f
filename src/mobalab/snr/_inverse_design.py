r"""Inverse design: which SNR, block size, top-k or head dim reaches a target hit probability.

See docs/design.md, "Inverse design".

The forward model is the paper's equal-variance Gaussian model (sd_ratio = 1 unless stated):
SNR = Δμ_eff·sqrt(d / 2B) (:func:`snr`), and the hit probability is either the exact non-causal top-k
probability over n = ceil(N / B) blocks (:func:`hit_probability`) or, with ``causal=True``, the causal
MoBA average over query and needle positions (:func:`causal_hit_probability`). Both increase strictly
with the SNR and with k, which is what the searches below rely on.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy.optimize import brentq

from .._validate import (
    broadcast,
    count,
    flag,
    probability,
    real,
    scalar_count,
    scalar_or_array,
    scalar_real,
)
from ._causal_hit import _EXACT_MAX, _average_parts, _weighted_past_sum, causal_hit_probability
from ._paper_snr import paper_threshold, snr
from ._topk_hit import _hit_core, hit_probability

__all__ = [
    "required_snr",
    "causal_required_snr",
    "design_table",
    "largest_block_size",
    "smallest_top_k",
    "smallest_head_dim",
]

_DEFAULT_BLOCK_SIZES = (16, 32, 64, 128, 256, 512)
_DEFAULT_HEAD_DIMS = (16, 32, 64, 128, 256, 512)
_SNR_LIMIT = 1e3


def _solve_increasing(func, target: float, guess: float) -> float:
    """Root of func(s) = target for func increasing in s; the bracket grows geometrically from guess."""
    step = 1.0
    lo, hi = guess - step, guess + step
    while func(lo) >= target:
        step *= 2.0
        lo = guess - step
        if lo < -_SNR_LIMIT:
            raise ValueError(f"no SNR above {-_SNR_LIMIT:g} gives a hit probability as low as {target!r}")
    step = 1.0
    while func(hi) < target:
        step *= 2.0
        hi = guess + step
        if hi > _SNR_LIMIT:
            raise ValueError(f"no SNR below {_SNR_LIMIT:g} reaches hit probability {target!r}")
    return brentq(lambda s: func(s) - target, lo, hi, xtol=1e-14, rtol=1e-15, maxiter=200)


def required_snr(target, n_blocks, top_k, sd_ratio=1.0):
    r"""Smallest SNR with :math:`P_{\rm hit}(\mathrm{SNR}; n, k, r) \ge` ``target``.

    .. math:: \mathrm{SNR}^* = \min\{\mathrm{SNR} : P_{\rm hit}(\mathrm{SNR}; n, k, r) \ge \text{target}\}

    P_hit is continuous and strictly increasing in SNR from 0 to 1, so this is the root of
    P_hit = target (Brent's method on a bracket grown around the paper's threshold Φ^{-1}(1 - k/n);
    |error| in P below 1e-9). ``target`` must lie strictly inside (0, 1). Where ``top_k >= n_blocks``
    every block is selected and any SNR works: the result is ``-inf``. Broadcasts over all arguments.

    Examples
    --------
    The paper's threshold for the top 8 of 2048 blocks is 2.66; reaching the needle's block 99 % of the
    time takes SNR 3.55:

    >>> from mobalab import snr
    >>> print(snr.required_snr([0.5, 0.9, 0.99], n_blocks=2048, top_k=8).round(3))
    [1.894 2.807 3.552]
    """
    t, n, k, r = broadcast(
        target=probability("target", target),
        n_blocks=count("n_blocks", n_blocks).astype(np.float64),
        top_k=count("top_k", top_k).astype(np.float64),
        sd_ratio=real("sd_ratio", sd_ratio, low=0.0),
    )
    out = np.full(t.shape, -np.inf)
    for idx in np.ndindex(t.shape):
        if k[idx] >= n[idx]:
            continue
        args = (np.array([n[idx]]), np.array([k[idx]]), np.array([r[idx]]))
        out[idx] = _solve_increasing(
            lambda s, args=args: float(_hit_core(np.array([s]), *args)[0]),
            float(t[idx]),
            float(paper_threshold(n[idx], k[idx])),
        )
    return scalar_or_array(out)


def causal_required_snr(target, seq_len, block_size, top_k, sd_ratio=1.0):
    r"""Smallest SNR at which the causal average (:func:`causal_hit_probability`) reaches ``target``.

    .. math:: \mathrm{SNR}^* = \min\{\mathrm{SNR} : \bar P(\mathrm{SNR}; N, B, k, r) \ge \text{target}\}

    The average never falls below the share of needles that sit in the query's own block (or in past
    blocks that all fit into the k - 1 free slots); for targets at or below that floor, and when
    N <= k·B, any SNR works and the result is ``-inf``. With ``top_k = 1`` the average does not depend
    on the SNR, and a target above it raises ValueError. Scalar arguments; ``target`` in (0, 1).

    Examples
    --------
    >>> from mobalab import snr
    >>> print(f"{snr.causal_required_snr(0.9, seq_len=8192, block_size=32, top_k=8):.3f}")
    2.034
    """
    t = _require_target(target)
    n_tok = scalar_count("seq_len", seq_len)
    bsz = scalar_count("block_size", block_size)
    k = scalar_count("top_k", top_k)
    r = scalar_real("sd_ratio", sd_ratio, low=0.0)
    if (n_tok - 1) // bsz <= k - 1:  # N <= k·B: dense causal attention, everything is found
        return -math.inf
    base, weights = _average_parts(n_tok, bsz, k)
    if base / n_tok >= t:
        return -math.inf
    if weights.size == 0:
        raise ValueError(
            f"with top_k = 1 only own-block needles are found: the causal average is "
            f"{base / n_tok:.6g} at every SNR, below target {t!r}"
        )
    rr = np.array([r])

    def average(s: float) -> float:
        return float((base + _weighted_past_sum(np.array([s]), rr, k - 1, weights, _EXACT_MAX)[0]) / n_tok)

    n_past = max(n_tok // bsz, k)
    return _solve_increasing(average, t, float(paper_threshold(n_past, k - 1)))


def _check_target(target):
    return None if target is None else _require_target(target)


def design_table(
    head_dim, seq_len, top_k, delta_mu_eff, block_sizes=_DEFAULT_BLOCK_SIZES, causal=True, target=None
) -> pd.DataFrame:
    r"""Tidy table of the design space over block sizes, one row per block size.

    .. math:: \mathrm{SNR}(B) = \Delta\mu_{\rm eff}\sqrt{d/2B},\quad n(B) = \lceil N/B\rceil,\quad
              P(B) = \bar P_{\rm causal}(\mathrm{SNR}(B); N, B, k)\ \text{or}\ P_{\rm hit}(\mathrm{SNR}(B); n(B), k)

    Columns: ``block_size``, ``n_blocks`` = ceil(N / B), ``snr`` = Δμ_eff·sqrt(d / 2B),
    ``paper_threshold`` = Φ^{-1}(1 - k/n), ``hit_probability`` (the causal average over query and
    needle positions when ``causal``, else the exact non-causal top-k probability), ``meets_target``
    (hit_probability >= target; nullable boolean, NA when ``target`` is None), then the inputs
    ``head_dim``, ``seq_len``, ``top_k``, ``delta_mu_eff``, ``causal``, ``target`` so tables concatenate.

    Examples
    --------
    Head dim 64, 128K tokens, top 8, Δμ_eff = 4, causal: blocks of 32 still reach 99 %, blocks of 64 do not
    (compare the paper's threshold with the SNR: it calls B = 64 fine):

    >>> from mobalab import snr
    >>> df = snr.design_table(64, 131072, 8, 4.0, target=0.99)
    >>> columns = ["block_size", "snr", "paper_threshold", "hit_probability", "meets_target"]
    >>> print(df[columns].round(3).to_string(index=False))
     block_size   snr  paper_threshold  hit_probability  meets_target
             16 5.657            3.097            1.000          True
             32 4.000            2.886            0.998          True
             64 2.828            2.660            0.938         False
            128 2.000            2.418            0.750         False
            256 1.414            2.154            0.572         False
            512 1.000            1.863            0.487         False
    """
    d = scalar_count("head_dim", head_dim)
    n_tok = scalar_count("seq_len", seq_len)
    k = scalar_count("top_k", top_k)
    dmu = scalar_real("delta_mu_eff", delta_mu_eff)
    causal = flag("causal", causal)
    tgt = _check_target(target)
    sizes = count("block_sizes", block_sizes)
    if sizes.ndim != 1 or sizes.size == 0:
        raise ValueError(f"block_sizes must be a non-empty 1-d sequence of integers, got {block_sizes!r}")
    rows = []
    for bsz in sizes.tolist():
        n_blocks = -(-n_tok // bsz)
        s = float(snr(d, bsz, dmu))
        if causal:
            p = float(causal_hit_probability(s, n_tok, bsz, k))
        else:
            p = float(hit_probability(s, n_blocks, k))
        rows.append(
            {
                "block_size": bsz,
                "n_blocks": n_blocks,
                "snr": s,
                "paper_threshold": float(paper_threshold(n_blocks, k)),
                "hit_probability": p,
                "meets_target": pd.NA if tgt is None else bool(p >= tgt),
            }
        )
    df = pd.DataFrame(rows)
    df["meets_target"] = df["meets_target"].astype("boolean")
    df["head_dim"] = d
    df["seq_len"] = n_tok
    df["top_k"] = k
    df["delta_mu_eff"] = dmu
    df["causal"] = bool(causal)
    df["target"] = math.nan if tgt is None else tgt
    return df


def largest_block_size(
    target, head_dim, seq_len, top_k, delta_mu_eff, causal=True, block_sizes=_DEFAULT_BLOCK_SIZES
):
    r"""Largest block size in ``block_sizes`` whose hit probability reaches ``target`` (None if none does).

    .. math:: B^* = \max\{B \in \text{block\_sizes} : P(B) \ge \text{target}\}

    with P(B) as in :func:`design_table`.

    Every candidate is evaluated (the hit probability need not be monotone in B, since n = ceil(N/B)
    changes with it). Same model and arguments as :func:`design_table`.

    Examples
    --------
    >>> from mobalab import snr
    >>> print(snr.largest_block_size(0.99, head_dim=64, seq_len=131072, top_k=8, delta_mu_eff=4.0))
    32
    """
    df = design_table(head_dim, seq_len, top_k, delta_mu_eff, block_sizes, causal, _require_target(target))
    ok = df.loc[df["meets_target"].astype(bool), "block_size"]
    return None if ok.empty else int(ok.max())


def _require_target(target) -> float:
    return scalar_real("target", target, low=0.0, high=1.0, low_open=True, high_open=True)


def smallest_top_k(target, head_dim, seq_len, block_size, delta_mu_eff, causal=True, max_top_k=1024):
    r"""Smallest top-k in [1, ``max_top_k``] whose hit probability reaches ``target`` (None if none does).

    .. math:: k^* = \min\{k \in [1, k_{\max}] : P(k) \ge \text{target}\},\quad
              \mathrm{SNR} = \Delta\mu_{\rm eff}\sqrt{d/2B}

    The hit probability increases with k (causal: more free slots), so this is a bisection over k.
    SNR = Δμ_eff·sqrt(d / 2B); causal average or non-causal probability as in :func:`design_table`.

    Examples
    --------
    >>> from mobalab import snr
    >>> print(snr.smallest_top_k(0.99, head_dim=64, seq_len=8192, block_size=64, delta_mu_eff=4.0))
    5
    """
    tgt = _require_target(target)
    d = scalar_count("head_dim", head_dim)
    n_tok = scalar_count("seq_len", seq_len)
    bsz = scalar_count("block_size", block_size)
    k_max = scalar_count("max_top_k", max_top_k)
    causal = flag("causal", causal)
    s = float(snr(d, bsz, scalar_real("delta_mu_eff", delta_mu_eff)))
    n_blocks = -(-n_tok // bsz)

    def prob(k: int) -> float:
        if causal:
            return float(causal_hit_probability(s, n_tok, bsz, k))
        return float(hit_probability(s, n_blocks, k))

    if prob(k_max) < tgt:
        return None
    lo, hi = 0, k_max  # prob(lo) < target (lo = 0 stands for "no slot"), prob(hi) >= target
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if prob(mid) >= tgt:
            hi = mid
        else:
            lo = mid
    return hi


def smallest_head_dim(
    target, seq_len, block_size, top_k, delta_mu_eff, causal=True, head_dims=_DEFAULT_HEAD_DIMS
):
    r"""Smallest head dim in ``head_dims`` whose hit probability reaches ``target`` (None if none does).

    .. math:: d^* = \min\{d \in \text{head\_dims} : P(\mathrm{SNR} = \Delta\mu_{\rm eff}\sqrt{d/2B}) \ge \text{target}\}

    Δμ_eff is held fixed in cosine units, so SNR = Δμ_eff·sqrt(d / 2B) grows with d. Same model as
    :func:`design_table`.

    Examples
    --------
    >>> from mobalab import snr
    >>> print(snr.smallest_head_dim(0.99, seq_len=131072, block_size=64, top_k=8, delta_mu_eff=4.0))
    128
    """
    tgt = _require_target(target)
    dims = count("head_dims", head_dims)
    if dims.ndim != 1 or dims.size == 0:
        raise ValueError(f"head_dims must be a non-empty 1-d sequence of integers, got {head_dims!r}")
    n_tok = scalar_count("seq_len", seq_len)
    bsz = scalar_count("block_size", block_size)
    k = scalar_count("top_k", top_k)
    causal = flag("causal", causal)
    dims = np.sort(dims)
    s = np.asarray(snr(dims, bsz, scalar_real("delta_mu_eff", delta_mu_eff)), dtype=np.float64)
    if causal:
        p = np.asarray(causal_hit_probability(s, n_tok, bsz, k))
    else:
        p = np.asarray(hit_probability(s, -(-n_tok // bsz), k))
    ok = np.flatnonzero(p >= tgt)
    return None if ok.size == 0 else int(dims[ok[0]])
