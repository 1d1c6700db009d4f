r"""Causal MoBA: the forced own block, complete past blocks only, and averages over positions.

See docs/design.md, "Causal routing"; the routing rules are those of docs/design.md, "MoBA semantics".

Conventions: sequence length N, block size B, top-k k. A query at position t has its own block
c = floor(t/B), which is always selected and counts toward k; the candidates are the c complete past
blocks j < c, of which the top k - 1 are added. A needle at position p <= t is

* always found if it lies in the own block (p // B == c): probability 1;
* otherwise in a complete past block competing with the other c - 1 past blocks for k - 1 slots:

.. math:: h(c) = P_{\rm hit}(\mathrm{SNR};\ n = c,\ k - 1)

(1 if k - 1 >= c, 0 if k = 1).

Averages. With the query given and the needle uniform on {0..t}:

.. math:: \bar P(t) = \frac{t - cB + 1}{t + 1} + \frac{cB}{t + 1}\, h(c).

With neither given, t is uniform on {0..N-1} and the needle uniform on {0..t} given t:

.. math:: \bar P = \frac1N \sum_{t=0}^{N-1} \bar P(t)
          = \frac1N \sum_{c} \Big[\ell_c - cB\,S_c + cB\,S_c\,h(c)\Big],\qquad
          S_c = \sum_{t \in \text{block } c} \frac1{t+1},

where ℓ_c is the number of positions in block c (the last block may be partial). This is exact: t is
grouped by c and h is needed once per distinct c. When there are many distinct c (large N / B), the
sum over c > k of W_c h(c) is evaluated by piecewise Chebyshev interpolation of h in log(c - k + 1),
refined until interpolation error at check points is below 1e-11 on every piece, then summed against
the exact weights at every integer c; small problems are summed term by term.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import digamma

from .._validate import broadcast, check_memory, count, real, scalar_count, scalar_or_array
from ._topk_hit import _hit_core

__all__ = ["causal_hit_probability"]

_EXACT_MAX = 256  # distinct past-block counts up to which the average is summed term by term
_CHEB_DEGREE = 12
_PANEL_EXACT = 2 * (_CHEB_DEGREE + 1)  # panels with this few integers are evaluated directly
_INTERP_TOL = 1e-11
_MAX_ROUNDS = 40
_BYTES_PER_BLOCK = 160  # peak float64 work arrays per block of the average (weights, harmonic sums, panels)
_PANEL_CHUNK = 1 << 16  # integers per step when an interpolant is summed against a panel's exact weights


def _harmonic_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    r"""sum_{t=a}^{b-1} 1/(t+1) = ψ(b+1) - ψ(a+1), without the cancellation of two large ψ's."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    x, y = a + 1.0, b + 1.0
    out = digamma(y) - digamma(x)
    big = x >= 64.0
    if np.any(big):
        x, y = x[big], y[big]
        # ψ(x) ~ ln x - 1/2x - Σ B_2j / (2j x^2j): take differences term by term (error < 1e-20 at x >= 64).
        diff = np.log1p((y - x) / x) + (y - x) / (2.0 * x * y)
        for coef, p in ((1 / 12, 2), (-1 / 120, 4), (1 / 252, 6), (-1 / 240, 8)):
            diff -= coef * (y**-p - x**-p)
        out[big] = diff
    return out


def _past_hit_matrix(s: np.ndarray, r: np.ndarray, kp: int, n_past: np.ndarray) -> np.ndarray:
    """h for rows (s, r) of shape (R,) against real past-block counts n_past (M,) with kp < n_past."""
    rows, cols = s.size, n_past.size
    vals = _hit_core(
        np.repeat(s, cols), np.tile(n_past, rows), np.full(rows * cols, float(kp)), np.repeat(r, cols)
    )
    return vals.reshape(rows, cols)


def _lobatto(lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
    j = np.arange(_CHEB_DEGREE + 1)
    nodes = 0.5 * (lo + hi) - 0.5 * (hi - lo) * np.cos(np.pi * j / _CHEB_DEGREE)
    bary = (-1.0) ** j
    bary[[0, -1]] *= 0.5
    return nodes, bary


def _lagrange(x: np.ndarray, nodes: np.ndarray, bary: np.ndarray) -> np.ndarray:
    """Lagrange basis of the barycentric interpolant on ``nodes`` at ``x``; shape (len(x), len(nodes))."""
    diff = x[:, None] - nodes[None, :]
    hit = diff == 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = bary / diff
        basis = terms / terms.sum(axis=1, keepdims=True)
    on_node = hit.any(axis=1)
    basis[on_node] = hit[on_node].astype(np.float64)
    return basis


def _weighted_past_sum(
    s: np.ndarray, r: np.ndarray, kp: int, weights: np.ndarray, exact_max: int
) -> np.ndarray:
    r"""Σ_{β=1}^{M} weights[β-1] · h(kp + β) for each row, h = P_hit(s, n = kp + β, k = kp, r)."""
    m_total = weights.size
    if m_total <= exact_max:
        return _past_hit_matrix(s, r, kp, kp + np.arange(1.0, m_total + 1.0)) @ weights

    total = np.zeros(s.size)
    edges = np.unique(np.round(np.exp(np.arange(0.0, math.log(m_total) + 1.0, 1.0))).astype(np.int64))
    edges = edges[edges <= m_total]
    panels = [(int(lo), int(hi) - 1) for lo, hi in zip(edges[:-1], edges[1:], strict=False)]
    panels.append((int(edges[-1]), m_total))  # integer ranges [β_lo, β_hi], inclusive
    for _ in range(_MAX_ROUNDS):
        if not panels:
            return total
        direct, interp, points = [], [], []
        for lo, hi in panels:
            if hi - lo + 1 <= _PANEL_EXACT:
                direct.append((lo, hi, len(points)))
                points.extend(range(lo, hi + 1))
            else:
                nodes, bary = _lobatto(math.log(lo), math.log(hi))
                checks = 0.5 * (nodes[[0, _CHEB_DEGREE // 2, -2]] + nodes[[1, _CHEB_DEGREE // 2 + 1, -1]])
                interp.append((lo, hi, len(points), nodes, bary, checks))
                points.extend(np.exp(np.concatenate([nodes, checks])).tolist())
        values = _past_hit_matrix(s, r, kp, kp + np.asarray(points, dtype=np.float64))
        panels = []
        for lo, hi, at in direct:
            total += values[:, at : at + hi - lo + 1] @ weights[lo - 1 : hi]
        for lo, hi, at, nodes, bary, checks in interp:
            f_nodes = values[:, at : at + nodes.size]
            f_checks = values[:, at + nodes.size : at + nodes.size + checks.size]
            err = np.max(np.abs(f_nodes @ _lagrange(checks, nodes, bary).T - f_checks))
            if err <= _INTERP_TOL:
                node_weights = np.zeros(nodes.size)
                for start in range(lo, hi + 1, _PANEL_CHUNK):  # chunks bound the (integers x nodes) basis
                    stop = min(start + _PANEL_CHUNK, hi + 1)
                    betas = np.arange(start, stop, dtype=np.float64)
                    node_weights += weights[start - 1 : stop - 1] @ _lagrange(np.log(betas), nodes, bary)
                total += f_nodes @ node_weights
            else:
                mid = int(round(math.sqrt(lo * hi)))
                mid = min(max(mid, lo), hi - 1)
                panels.extend([(lo, mid), (mid + 1, hi)])
    raise RuntimeError("causal average: interpolation of the past-block hit probability did not converge")


def _average_parts(seq_len: int, block_size: int, top_k: int):
    """(base, weights): mean = (base + Σ_β weights[β-1] h(k-1+β)) / N, over past blocks c = k-1+β."""
    n_blocks = -(-seq_len // block_size)
    check_memory(
        f"the causal average over n = ceil({seq_len} / {block_size}) = {n_blocks} blocks",
        n_blocks * _BYTES_PER_BLOCK,
        "give query_pos (and needle_pos) for point values, or use a larger block_size",
    )
    c = np.arange(n_blocks, dtype=np.float64)
    starts = c * block_size
    ends = np.minimum(starts + block_size, seq_len)
    past = starts * _harmonic_diff(starts, ends)  # Σ_t cB/(t+1): needle in a past block
    own = (ends - starts) - past  # Σ_t (t-cB+1)/(t+1): needle in the own block
    base = own.sum()
    if top_k == 1:
        return base, np.zeros(0)
    sure = c <= top_k - 1  # every past block fits into the k-1 free slots
    base += past[sure].sum()
    return base, past[~sure]


def _past_hit_points(s, r, c, top_k):
    """h(c) on flat (s, r, c) arrays of one length."""
    out = np.zeros(s.shape) if top_k == 1 else np.ones(s.shape)
    if top_k > 1:
        live = c > top_k - 1
        if np.any(live):
            out[live] = _hit_core(s[live], c[live], np.full(int(live.sum()), top_k - 1.0), r[live])
    return out


def causal_hit_probability(
    snr, seq_len, block_size, top_k, query_pos=None, needle_pos=None, sd_ratio=1.0, *, _exact_max=_EXACT_MAX
):
    r"""Hit probability of causal MoBA (own block forced, k - 1 free slots among complete past blocks).

    .. math::
        P(t, p) = \begin{cases} 1 & \lfloor p/B\rfloor = c \\
                                 h(c) = P_{\rm hit}(\mathrm{SNR};\ n = c,\ k - 1) & \text{otherwise}
                  \end{cases},\qquad c = \lfloor t/B \rfloor,

    averaged over the needle, :math:`\bar P(t) = \frac{t - cB + 1}{t + 1} + \frac{cB}{t + 1} h(c)`, and
    over the query, :math:`\bar P = \frac1N\sum_t \bar P(t)`. Three modes (module docstring: conventions
    and how the average is summed):

    * ``query_pos`` and ``needle_pos`` given: the point value, 1 if p // B == t // B, else
      h(t // B) = P_hit(SNR; n = t // B, k - 1) (1 if k - 1 >= t // B, 0 if k = 1).
    * only ``query_pos`` given: needle uniform on {0..t}.
    * neither given: t uniform on {0..N-1}, needle uniform on {0..t}; computed exactly by grouping t by
      its block (fast for N up to 10^6 and beyond).

    ``snr`` and ``sd_ratio`` are as in :func:`hit_probability` and broadcast with each other, and in the
    point modes with ``query_pos`` / ``needle_pos``. ``seq_len``, ``block_size``, ``top_k`` are scalar
    integers >= 1; positions are integers in [0, seq_len) with needle_pos <= query_pos. If
    N <= k·B every needle is found (the result is 1), as MoBA then equals dense causal attention.

    Examples
    --------
    Causal MoBA at 64K tokens, blocks of 32, top 8, SNR 2: averaged over query and needle positions the
    own block (always selected) lifts the hit rate above the non-causal 0.559:

    >>> from mobalab import snr
    >>> s = snr.snr(d=64, block_size=32, delta_mu_eff=2.0)
    >>> print(f"{snr.causal_hit_probability(s, seq_len=65536, block_size=32, top_k=8):.3f}")
    0.665

    Point values: a needle in the query's own block is always found; one in the past competes for k - 1
    slots among the query's complete past blocks:

    >>> print(snr.causal_hit_probability(s, 65536, 32, 8, query_pos=1000, needle_pos=995))
    1.0
    >>> print(f"{snr.causal_hit_probability(s, 65536, 32, 8, query_pos=65535, needle_pos=0):.3f}")
    0.540
    """
    s = real("snr", snr)
    r = real("sd_ratio", sd_ratio, low=0.0)
    n_tok = scalar_count("seq_len", seq_len)
    bsz = scalar_count("block_size", block_size)
    k = scalar_count("top_k", top_k)
    if needle_pos is not None and query_pos is None:
        raise ValueError("needle_pos given without query_pos: give both, only query_pos, or neither")

    if query_pos is not None:
        t = count("query_pos", query_pos, 0)
        if np.any(t > n_tok - 1):
            raise ValueError(f"query_pos must be < seq_len = {n_tok}, got {np.max(t)}")
        if needle_pos is None:
            s_b, r_b, t_b = broadcast(snr=s, sd_ratio=r, query_pos=t)
            t_f = t_b.ravel().astype(np.float64)
            c_f = np.floor(t_f / bsz)
            h = _past_hit_points(*(np.array(v, dtype=np.float64).ravel() for v in (s_b, r_b)), c_f, k)
            out = (t_f - c_f * bsz + 1.0) / (t_f + 1.0) + (c_f * bsz) / (t_f + 1.0) * h
            return scalar_or_array(out.reshape(s_b.shape))
        s_b, r_b, t_b, p_b = broadcast(snr=s, sd_ratio=r, query_pos=t, needle_pos=count("needle_pos", needle_pos, 0))
        if np.any(p_b > t_b):
            raise ValueError(
                f"needle_pos must be <= query_pos (causal), got needle_pos={needle_pos!r}, "
                f"query_pos={query_pos!r}"
            )
        c = (t_b // bsz).ravel().astype(np.float64)
        h = _past_hit_points(*(np.array(v, dtype=np.float64).ravel() for v in (s_b, r_b)), c, k)
        own = (p_b // bsz).ravel() == c
        return scalar_or_array(np.where(own, 1.0, h).reshape(s_b.shape))

    s_b, r_b = (np.array(v, dtype=np.float64) for v in broadcast(snr=s, sd_ratio=r))
    if (n_tok - 1) // bsz <= k - 1:  # N <= k·B: every past block fits, dense causal attention
        return scalar_or_array(np.ones(s_b.shape))
    base, weights = _average_parts(n_tok, bsz, k)
    total = np.full(s_b.size, base)
    if weights.size:
        total += _weighted_past_sum(s_b.ravel(), r_b.ravel(), k - 1, weights, _exact_max)
    return scalar_or_array(np.clip(total / n_tok, 0.0, 1.0).reshape(s_b.shape))
