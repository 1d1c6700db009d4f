r"""Rotary position encoding (RoPE) in the routing model: a span's signal is low-pass filtered by the centroid.

RoPE. Head dim d (even), P = d/2 frequency pairs, :math:`\theta_i = \mathrm{base}^{-2i/d}` (i = 0..P-1).
Position s rotates pair i, the coordinates :math:`(x_{2i}, x_{2i+1})` (interleaved pairs), by the angle
:math:`s\theta_i`; write :math:`R_s`. Then
:math:`\langle R_t q, R_s k\rangle = \sum_i \mathrm{Re}[q_i \bar k_i e^{i(t-s)\theta_i}]` (pair i as the
complex number :math:`x_{2i} + i x_{2i+1}`) depends on the positions only through t - s.

The model (what :func:`mobalab.simulate.rope_vector_router` samples). Pre-RoPE vectors as in the planted
generator: q and the noise keys uniform on :math:`S^{d-1}`. A *span* of m relevant tokens sits at the
consecutive positions :math:`s_j = p - a + j` (j = 0..m-1) inside the needle's block; the needle is
token a of the span, at position p. The span tokens share one content direction u (the same information
at neighbouring positions): :math:`k_{s_j} = \mu_j u + \sqrt{1-\mu_j^2}\,\xi_j`, ξ_j uniform on the
sphere (isotropic planting), :math:`\mu_a = \mu_{\rm signal}`, :math:`\mu_j = \mu_{\rm cluster}` otherwise.
The query matches the content *at a reference position r*: :math:`u = R_{t-r}\,q`, so that a key holding
the content at position r is exactly aligned with the rotated query :math:`\tilde q = R_t q`. The lag of
the needle behind that reference, λ = p - r, selects the model:

* **needle-anchored** (λ = 0, the default): the query is planted to match the needle *at its relative
  offset* t - p, so the needle's post-RoPE affinity is μ_signal as in the paper's model (the μ's are what
  attention sees, after RoPE); the other span tokens hold the same content at neighbouring positions;
  the query position t drops out;
* **content match** (r = t, λ = p - t): the pre-RoPE query equals the content, a position-independent
  match; RoPE then also decays the needle's own affinity with the distance t - p.

After RoPE a span token at offset :math:`o_j = s_j - r = j - a + \lambda` has
:math:`\tilde q\cdot\tilde k_{s_j} = \mu_j \sum_i w_i \cos(o_j\theta_i) + \sqrt{1-\mu_j^2}\,\tilde q\cdot\tilde\xi_j`
with :math:`w_i = q_{2i}^2 + q_{2i+1}^2` the query's energy in pair i (Σ w_i = 1). The signal block's
score is

.. math::
    s^* = \frac1B\Big[\sum_i w_i A_i + Y\Big],\qquad A_i = \sum_{j<m}\mu_j\cos(o_j\theta_i),

Y the token noise (mean 0, variance :math:`[\sum_j (1-\mu_j^2) + (B-m)]/d`, independent of w). Noise
blocks are unchanged (a rotated uniform key is uniform): mean 0, variance 1/(dB), independent of q.

Per-pair factor. For equal cosines the span's sum in pair i is m μ F_i with

.. math::
    F_i = \frac1m\sum_{j<m}\cos(o_j\theta_i) = K_m(\theta_i)\cos\big((c - a + \lambda)\theta_i\big),\quad
    K_m(\varphi) = \frac{\sin(m\varphi/2)}{m\sin(\varphi/2)},\ c = \frac{m-1}2,

the Dirichlet kernel K_m times the phase of the span's centre relative to the reference, so
:math:`|F_i| \le D_m(\theta_i) = |K_m(\theta_i)|` (:func:`dirichlet_factor`), with equality for a query
anchored at the span's centre. Pairs with :math:`m\theta_i \gtrsim 2\pi` cancel: mean pooling a
coherent span is a low-pass filter over the frequency pairs.

Effective signal. q uniform on the sphere makes :math:`(w_0..w_{P-1})` uniform on the simplex,
Dirichlet(1, ..., 1), so E w_i = 1/P and

.. math::
    \Delta\mu_{\rm eff}^{\rm RoPE} = \frac1P\sum_i A_i = \sum_j \mu_j\, g(o_j),\qquad
    g(o) = \frac1P\sum_i\cos(o\,\theta_i)\ \ (g(0) = 1),

against the RoPE-blind :math:`\mu_s + (m-1)\mu_c`. With ρ = μ_c/μ_s the clustering multiplier
1 + (m-1)ρ becomes :math:`g(\lambda) + \rho\sum_{j\ne a} g(o_j)`.

Variance. The token variances are unchanged, but the signal now depends on how the query's energy is
spread over the pairs: :math:`\mathrm{Var}\sum_i w_i A_i = \sum_i (A_i - \bar A)^2 / (P(P+1))`
(Dirichlet covariance), the *phase variance* V_phase, which is 0 without RoPE and for a lone
needle-anchored needle. Hence

.. math::
    \mathbb E s^* - \mathbb E s_{\rm noise} = \frac{\Delta\mu_{\rm eff}^{\rm RoPE}}B,\quad
    \mathrm{Var}\,s^* = \frac{\sum_j(1-\mu_j^2)/d + (B-m)/d + V_{\rm phase}}{B^2},\quad
    \mathrm{Var}\,s_{\rm noise} = \frac1{dB},

and P(hit) follows from :func:`mobalab.snr.hit_probability` (or :func:`mobalab.snr.causal_hit_probability`
at given positions) with snr = mean difference / sqrt(sum of variances) and sd_ratio = sqrt(Var s* /
Var s_noise). These are exact first two moments; the Gaussian law of Σ w_i A_i (a linear function of a
Dirichlet vector) is an approximation that is good when P is not small and V_phase does not dominate.
See docs/design.md, "RoPE".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .. import _validate as V

__all__ = [
    "rope_frequencies",
    "dirichlet_factor",
    "rope_pair_factors",
    "rope_clustering_multiplier",
    "rope_delta_mu_eff",
    "RopeBlockModel",
    "rope_block_model",
]


# ---------------------------------------------------------------------------------------------------
# argument checks (scalars; each error names the argument, the value and what is allowed)


def _head_dim(head_dim) -> int:
    d = V.scalar_count("head_dim", head_dim, 2)
    if d % 2:
        raise ValueError(f"head_dim must be even (RoPE rotates pairs of coordinates), got {d}")
    return d


def _span(m, needle_index, needle_lag) -> tuple[int, int, int]:
    m = V.scalar_count("m", m, 1)
    a = V.scalar_count("needle_index", needle_index, 0)
    if a >= m:
        raise ValueError(f"needle_index must lie in [0, m = {m}) (the needle is a token of the span), got {a}")
    return m, a, V.scalar_count("needle_lag", needle_lag, None)


# ---------------------------------------------------------------------------------------------------
# frequencies and the Dirichlet kernel


def rope_frequencies(head_dim, base=10000.0) -> np.ndarray:
    r"""RoPE angular frequencies :math:`\theta_i = \mathrm{base}^{-2i/d}`, i = 0..d/2-1 (radians per token).

    ``head_dim`` even and >= 2, ``base`` > 1. Pair 0 turns by 1 radian per token; the last pair has the
    longest wavelength, :math:`2\pi\,\mathrm{base}^{1-2/d}` tokens.

    Examples
    --------
    >>> from mobalab.snr import rope_frequencies
    >>> rope_frequencies(8, base=10000.0).round(4).tolist()
    [1.0, 0.1, 0.01, 0.001]
    """
    d = _head_dim(head_dim)
    b = V.rope_base(base)
    return b ** (-2.0 * np.arange(d // 2) / d)


def _dirichlet_signed(m, phi):
    """K_m(φ) = sin(mφ/2) / (m sin(φ/2)), with the limit ±1 where sin(φ/2) = 0."""
    m = np.asarray(m, dtype=np.float64)
    phi = np.asarray(phi, dtype=np.float64)
    half = np.sin(0.5 * phi)
    degenerate = np.abs(half) < 1e-12
    safe = np.where(degenerate, 1.0, half)
    # At φ = 2πl the sum Σ_j e^{ijφ} is m exactly; the sign of the closed form there is cos(πl)^(m-1).
    limit = np.where(np.cos(0.5 * phi) ** (m - 1.0) < 0.0, -1.0, 1.0)
    return np.where(degenerate, limit, np.sin(0.5 * m * phi) / (m * safe))


def dirichlet_factor(m, phi):
    r"""Coherence of m unit phasors at consecutive multiples of an angle: the Dirichlet factor.

    .. math:: D_m(\varphi) = \frac1m\Big|\sum_{j<m} e^{ij\varphi}\Big|
              = \frac{|\sin(m\varphi/2)|}{m\,|\sin(\varphi/2)|}

    (1 where :math:`\sin(\varphi/2) = 0`, i.e. φ a multiple of 2π). It is the fraction of a span's m
    contributions that survives the mean in one RoPE pair of angle φ = θ_i: D_1 = 1, D_m(0) = 1, and
    D_m(2πl/m) = 0 for l not a multiple of m. ``m``: integer(s) >= 1; ``phi``: finite real(s) (radians).
    Broadcasts; returns a float for scalar input.

    Examples
    --------
    >>> from mobalab.snr import dirichlet_factor
    >>> round(dirichlet_factor(1, 2.0), 6), round(dirichlet_factor(8, 0.0), 6)
    (1.0, 1.0)
    >>> round(dirichlet_factor(16, 0.1), 4)
    0.8971
    """
    m_arr, phi_arr = V.broadcast(m=V.count("m", m, 1), phi=V.real("phi", phi))
    out = np.minimum(np.abs(_dirichlet_signed(m_arr, phi_arr)), 1.0)
    return float(out) if out.ndim == 0 else out


# ---------------------------------------------------------------------------------------------------
# the span model


def _span_offsets(m: int, a: int, lag: int) -> np.ndarray:
    """o_j = j - a + λ: span token j's position minus the reference position r (the needle is j = a)."""
    return np.arange(m, dtype=np.float64) - a + lag


def rope_pair_factors(head_dim, m, base=10000.0, needle_index=0, needle_lag=0) -> np.ndarray:
    r"""Per-pair factor of a span of m equal-cosine tokens: what survives of its m contributions in pair i.

    .. math::
        F_i = \frac1m\sum_{j<m}\cos\big((j - a + \lambda)\,\theta_i\big)
            = K_m(\theta_i)\,\cos\big((\tfrac{m-1}2 - a + \lambda)\,\theta_i\big),\qquad |F_i| \le D_m(\theta_i),

    with a = ``needle_index`` (the needle's index in the span) and λ = ``needle_lag`` (needle position
    minus the position at which the query matches the content; 0 = needle-anchored, p - t = content
    match; module docstring). The span's pair-i signal is m·μ·F_i, against m·μ without RoPE. Returns an
    array of the d/2 factors, pair 0 (fastest) first.

    Examples
    --------
    >>> from mobalab.snr import rope_pair_factors
    >>> rope_pair_factors(8, 4, base=10000.0, needle_index=1).round(3).tolist()
    [0.416, 0.993, 1.0, 1.0]
    """
    d = _head_dim(head_dim)
    m, a, lag = _span(m, needle_index, needle_lag)
    theta = rope_frequencies(d, base)
    return _dirichlet_signed(m, theta) * np.cos((0.5 * (m - 1) - a + lag) * theta)


def _coherence(offsets: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """g(o) = (1/P) Σ_i cos(o θ_i): E over the query of q̃·R_o q̃ (RoPE's autocorrelation at offset o)."""
    return np.cos(np.outer(offsets, theta)).mean(axis=1)


def rope_clustering_multiplier(m, rho, head_dim, base=10000.0, needle_index=0, needle_lag=0):
    r"""The clustering multiplier with RoPE: Δμ_eff / Δμ for a span of m tokens (module docstring).

    .. math::
        g(\lambda) + \rho\sum_{j\ne a} g(j - a + \lambda),\qquad g(o) = \frac{2}{d}\sum_{i<d/2}\cos(o\,\theta_i),

    against the RoPE-blind 1 + (m-1)ρ (:func:`mobalab.snr.clustering_multiplier`), which it equals for
    base → ∞. ``rho`` (real, broadcasts) = (μ_cluster - μ_noise)/Δμ; m, head_dim, needle_index,
    needle_lag: integers as in :func:`rope_pair_factors`.

    Examples
    --------
    >>> from mobalab.snr import rope_clustering_multiplier
    >>> round(rope_clustering_multiplier(16, 1.0, head_dim=64, base=10000.0, needle_index=7), 3)
    12.892
    """
    d = _head_dim(head_dim)
    m, a, lag = _span(m, needle_index, needle_lag)
    rho_arr = V.real("rho", rho)
    g = _coherence(_span_offsets(m, a, lag), rope_frequencies(d, base))
    out = g[a] + rho_arr * (g.sum() - g[a])
    return float(out) if out.ndim == 0 else out


def rope_delta_mu_eff(delta_mu, head_dim, m=1, mu_cluster=0.0, mu_noise=0.0, *, base=10000.0, needle_index=0,
                      needle_lag=0):
    r"""Effective signal of a span with RoPE: the paper's Δμ_eff with every offset's coherence g(o).

    .. math::
        \Delta\mu_{\rm eff}^{\rm RoPE} = \Delta\mu\, g(\lambda)
        + (\mu_{\rm cluster} - \mu_{\rm noise})\sum_{j\ne a} g(j - a + \lambda)

    (the excess affinities are what the shared content carries, so they rotate; μ_noise is a
    position-independent offset). Without RoPE every g is 1 and this is
    :func:`mobalab.snr.delta_mu_eff`. ``delta_mu`` (real), ``mu_cluster`` and ``mu_noise`` (cosines in
    [-1, 1]) broadcast.

    Examples
    --------
    >>> from mobalab.snr import delta_mu_eff, rope_delta_mu_eff
    >>> round(delta_mu_eff(0.2, 16, 0.2), 3), round(rope_delta_mu_eff(0.2, 64, 16, 0.2, needle_index=7), 3)
    (3.2, 2.578)
    """
    dmu, mu_c, mu_n = V.broadcast(delta_mu=V.real("delta_mu", delta_mu), mu_cluster=V.cosine("mu_cluster", mu_cluster),
                                  mu_noise=V.cosine("mu_noise", mu_noise))
    excess = mu_c - mu_n
    d = _head_dim(head_dim)
    m, a, lag = _span(m, needle_index, needle_lag)
    g = _coherence(_span_offsets(m, a, lag), rope_frequencies(d, base))
    out = dmu * g[a] + excess * (g.sum() - g[a])
    return float(out) if out.ndim == 0 else out


@dataclass(frozen=True)
class RopeBlockModel:
    r"""Gaussian block-score model of a RoPE'd span (module docstring); scalars except ``pair_factors``.

    mean_diff = Δμ_eff^RoPE / B; var_signal, var_noise: variances of the signal and a noise block score
    (var_signal includes var_phase / B²); snr = mean_diff / sqrt(var_signal + var_noise) and sd_ratio =
    sqrt(var_signal / var_noise): pass both to :func:`mobalab.snr.hit_probability`. paper_snr =
    Δμ_eff^RoPE·sqrt(d / 2B). var_phase: the phase variance V_phase (per-token units, before the 1/B²).
    delta_mu_eff, multiplier (= delta_mu_eff / mu_signal): with RoPE; blind_delta_mu_eff =
    μ_s + (m-1)μ_c, blind_multiplier = 1 + (m-1)μ_c/μ_s, blind_snr, blind_sd_ratio: the same generator
    without RoPE (:func:`mobalab.snr.generator_block_model`). pair_factors: the F_i of the span (equal
    cosines). The multipliers are NaN when mu_signal = 0. The SNR that the exact top-k formula takes:

    .. math:: \mathrm{SNR} = \frac{\Delta\mu_{\rm eff}^{\rm RoPE}/B}{\sqrt{\sigma_{\rm signal}^2
              + \sigma_{\rm noise}^2}}, \qquad r = \sigma_{\rm signal}/\sigma_{\rm noise}.

    Examples
    --------
    >>> from mobalab import snr
    >>> lone = snr.rope_block_model(64, 64, 0.5, m=1, mu_cluster=0.0)   # a lone needle: RoPE changes nothing
    >>> round(lone.snr, 3), round(lone.blind_snr, 3)
    (0.354, 0.354)
    >>> span = snr.rope_block_model(64, 64, 0.3, m=16, mu_cluster=0.3, needle_index=8)
    >>> round(span.delta_mu_eff, 2), round(span.blind_delta_mu_eff, 2)   # a 16-token span loses signal
    (3.87, 4.8)
    """

    mean_diff: float
    var_signal: float
    var_noise: float
    snr: float
    sd_ratio: float
    paper_snr: float
    var_phase: float
    delta_mu_eff: float
    multiplier: float
    blind_delta_mu_eff: float
    blind_multiplier: float
    blind_snr: float
    blind_sd_ratio: float
    pair_factors: np.ndarray


def rope_block_model(head_dim, block_size, mu_signal, m=1, mu_cluster=0.0, *, base=10000.0, needle_index=0,
                     needle_lag=0) -> RopeBlockModel:
    r"""Exact block-score moments of a span of m tokens inside one block, with RoPE (module docstring).

    .. math::
        \text{mean\_diff} = \frac1{PB}\sum_i A_i,\quad
        \text{var\_signal} = \frac{[(1-\mu_s^2) + (m-1)(1-\mu_c^2) + B - m]/d + V_{\rm phase}}{B^2},\quad
        \text{var\_noise} = \frac1{dB},

    :math:`A_i = \mu_s\cos(\lambda\theta_i) + \mu_c\sum_{j\ne a}\cos((j-a+\lambda)\theta_i)`,
    :math:`V_{\rm phase} = \sum_i (A_i-\bar A)^2/(P(P+1))`, P = d/2. Isotropic planting (the only
    planting this model covers). ``head_dim`` even >= 2; ``1 <= m <= block_size``; |mu_signal|,
    |mu_cluster| <= 1; ``base`` > 1; ``needle_index`` in [0, m); ``needle_lag`` an integer (0 =
    needle-anchored; p - t for a content match with the query at t and the needle at p).

    Examples
    --------
    >>> from mobalab.snr import hit_probability, rope_block_model
    >>> mod = rope_block_model(64, 64, 0.2, m=16, mu_cluster=0.2, base=10000.0, needle_index=7)
    >>> round(mod.blind_snr, 3), round(mod.snr, 3), round(mod.var_phase, 4)
    (2.268, 1.809, 0.0414)
    >>> round(hit_probability(mod.blind_snr, 16, 2, sd_ratio=mod.blind_sd_ratio), 3)
    0.964
    >>> round(hit_probability(mod.snr, 16, 2, sd_ratio=mod.sd_ratio), 3)
    0.887
    """
    d = _head_dim(head_dim)
    bsz = V.scalar_count("block_size", block_size, 1)
    m, a, lag = _span(m, needle_index, needle_lag)
    if m > bsz:
        raise ValueError(f"m = {m} span tokens do not fit in a block of block_size = {bsz}")
    mu_s = V.scalar_cosine("mu_signal", mu_signal)
    mu_c = V.scalar_cosine("mu_cluster", mu_cluster)
    theta = rope_frequencies(d, base)
    n_pairs = d // 2
    weights = np.full(m, mu_c)
    weights[a] = mu_s
    amp = np.cos(np.outer(theta, _span_offsets(m, a, lag))) @ weights  # A_i
    dmu_eff = float(amp.mean())
    var_phase = float(((amp - dmu_eff) ** 2).sum() / (n_pairs * (n_pairs + 1)))
    var_tokens = ((1.0 - mu_s**2) + (m - 1) * (1.0 - mu_c**2) + (bsz - m)) / d
    var_signal = (var_tokens + var_phase) / bsz**2
    var_noise = 1.0 / (d * bsz)
    blind_dmu = mu_s + (m - 1) * mu_c
    blind_var_signal = var_tokens / bsz**2
    mean_diff = dmu_eff / bsz
    return RopeBlockModel(
        mean_diff=mean_diff,
        var_signal=var_signal,
        var_noise=var_noise,
        snr=mean_diff / math.sqrt(var_signal + var_noise),
        sd_ratio=math.sqrt(var_signal / var_noise),
        paper_snr=dmu_eff * math.sqrt(d / (2.0 * bsz)),
        var_phase=var_phase,
        delta_mu_eff=dmu_eff,
        multiplier=dmu_eff / mu_s if mu_s != 0 else math.nan,
        blind_delta_mu_eff=blind_dmu,
        blind_multiplier=blind_dmu / mu_s if mu_s != 0 else math.nan,
        blind_snr=blind_dmu / bsz / math.sqrt(blind_var_signal + var_noise),
        blind_sd_ratio=math.sqrt(blind_var_signal / var_noise),
        pair_factors=_dirichlet_signed(m, theta) * np.cos((0.5 * (m - 1) - a + lag) * theta),
    )
