r"""Exact block-score moments of the vector generator that the simulators and kernel experiments use.

See docs/design.md, "Generator variance".

Generator (the contract with :mod:`mobalab.simulate`):

* the query q is uniform on the unit sphere S^{d-1}; noise keys are i.i.d. uniform on S^{d-1};
* a key planted with cosine mu is k = mu·q + sqrt(1 - mu²)·ξ, where ξ is

  - ``planted="isotropic"`` (default): uniform on S^{d-1}, independent of q;
  - ``planted="exact"``: uniform on the unit sphere of the hyperplane orthogonal to q;

* the signal block (B keys) holds the needle (cosine mu_signal), m - 1 clustered keys (cosine
  mu_cluster) and B - m noise keys; a noise block holds B noise keys. Block score = q · (mean of keys).

Moments. For u uniform on S^{d-1} and any fixed unit q, q·u has mean 0 and variance 1/d exactly
(E (q·u)² = |q|²/d by symmetry), and its law does not depend on q. Hence

* noise key: q·k has mean 0, variance 1/d;
* isotropic planted key: q·k = mu + sqrt(1-mu²)·q·ξ, mean mu, variance (1 - mu²)/d;
  (|k|² = 1 + 2 mu sqrt(1-mu²) q·ξ has mean 1, so |k| = 1 on average, not exactly);
* exact planted key: q·ξ = 0, so q·k = mu exactly (variance 0) and |k| = 1.

Given q the per-key terms are independent, and their laws do not depend on q, so the block scores are
independent of each other and of q, with

.. math::
    \mathbb E[s_{\rm signal}] - \mathbb E[s_{\rm noise}] = \frac{\mu_s + (m-1)\mu_c}{B}
    = \frac{\Delta\mu_{\rm eff}}{B},
    \quad \mathrm{Var}\,s_{\rm signal} = \frac{v(\mu_s) + (m-1)v(\mu_c) + (B-m)/d}{B^2},
    \quad \mathrm{Var}\,s_{\rm noise} = \frac{1}{dB},

v(mu) being :func:`planted_token_variance` (mu_noise = 0 here). These are the exact first two moments.
The block score is however a sum of bounded, non-Gaussian terms (q·u has density ∝ (1 - x²)^{(d-3)/2}),
so treating it as Gaussian (what :func:`hit_probability` integrates) is a central-limit approximation
whose error grows as B (and d) shrink and matters most in the far tails, i.e. for large n.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._validate import broadcast, choice, cosine, count, scalar_or_array

__all__ = ["BlockScoreModel", "planted_token_variance", "generator_block_model"]

_PLANTED = ("isotropic", "exact")


def planted_token_variance(mu, d, planted="isotropic"):
    r"""Variance of q·k for a key planted with cosine ``mu`` in dimension ``d``.

    .. math:: v(\mu) = (1 - \mu^2)/d \ \ (\text{isotropic}),\qquad v(\mu) = 0\ \ (\text{exact})

    ``mu = 0`` (isotropic) is a plain noise key, variance 1/d. Broadcasts over ``mu`` and ``d``
    (``d >= 1`` integer-valued, |mu| <= 1).

    Examples
    --------
    >>> from mobalab import snr
    >>> print(snr.planted_token_variance(0.5, 64), snr.planted_token_variance(0.5, 64, planted="exact"))
    0.01171875 0.0
    """
    choice("planted", planted, _PLANTED)
    mu_arr, d_arr = broadcast(mu=cosine("mu", mu), d=count("d", d))
    if planted == "exact":
        return scalar_or_array(np.zeros(mu_arr.shape))
    return scalar_or_array((1.0 - mu_arr**2) / d_arr)


@dataclass(frozen=True)
class BlockScoreModel:
    r"""Gaussian block-score model of the generator (fields are floats, or arrays for array input).

    .. math::
        \mathrm{snr} = \frac{\text{mean\_diff}}{\sqrt{\text{var\_signal} + \text{var\_noise}}},\qquad
        \text{sd\_ratio} = \sqrt{\text{var\_signal} / \text{var\_noise}}

    mean_diff: E s_signal - E s_noise = Δμ_eff / B. var_signal, var_noise: variances of the two block
    scores. snr = mean_diff / sqrt(var_signal + var_noise) and sd_ratio = sqrt(var_signal / var_noise):
    pass both to :func:`hit_probability`. paper_snr = Δμ_eff·sqrt(d / 2B), the paper's value, which
    assumes var_signal = var_noise = 1/(dB).

    Examples
    --------
    >>> from mobalab import snr
    >>> model = snr.generator_block_model(64, 32, 0.5, m=3, mu_cluster=0.5)
    >>> print(f"{model.snr:.3f} {model.sd_ratio:.3f} {model.paper_snr:.3f}")
    1.509 0.988 1.500
    >>> print(f"{snr.hit_probability(model.snr, 2048, 8, sd_ratio=model.sd_ratio):.3f}")
    0.288
    """

    mean_diff: float
    var_signal: float
    var_noise: float
    snr: float
    sd_ratio: float
    paper_snr: float


def generator_block_model(head_dim, block_size, mu_signal, m=1, mu_cluster=0.0, planted="isotropic"):
    r"""Exact mean and variances of the signal and noise block scores of the generator (module docstring).

    .. math::
        \text{mean\_diff} = \frac{\mu_s + (m-1)\mu_c}{B},\quad
        \text{var\_signal} = \frac{v(\mu_s) + (m-1)v(\mu_c) + (B-m)/d}{B^2},\quad
        \text{var\_noise} = \frac{1}{dB},

    snr = mean_diff / sqrt(var_signal + var_noise), sd_ratio = sqrt(var_signal / var_noise), and
    paper_snr = (mu_s + (m-1) mu_c)·sqrt(d / 2B). The Gaussian law of the block scores is a CLT
    approximation (the block score is a sum of non-Gaussian terms): its error grows as B shrinks.

    ``head_dim >= 1`` and ``block_size >= 1`` integers, ``1 <= m <= block_size`` integer (m counts the
    needle), |mu_signal|, |mu_cluster| <= 1, ``planted`` in {"isotropic", "exact"} ("exact" needs
    head_dim >= 2 so that a unit vector orthogonal to q exists). Broadcasts over array arguments.

    Examples
    --------
    A needle and two companions of cosine 0.5 in a block of 32 keys at head dim 64: the planted keys vary
    less than noise keys, so the exact SNR is a little above the paper's 1.5:

    >>> from mobalab import snr
    >>> model = snr.generator_block_model(64, 32, 0.5, m=3, mu_cluster=0.5)
    >>> print(f"snr {model.snr:.4f}, paper {model.paper_snr:.4f}, sd_ratio {model.sd_ratio:.4f}")
    snr 1.5089, paper 1.5000, sd_ratio 0.9882
    """
    choice("planted", planted, _PLANTED)
    d, bsz, m_arr, mu_s, mu_c = broadcast(
        head_dim=count("head_dim", head_dim),
        block_size=count("block_size", block_size),
        m=count("m", m),
        mu_signal=cosine("mu_signal", mu_signal),
        mu_cluster=cosine("mu_cluster", mu_cluster),
    )
    if np.any(m_arr > bsz):
        raise ValueError(
            f"m (keys in the signal block, needle included) must be <= block_size, got m={m!r}, "
            f"block_size={block_size!r}"
        )
    if planted == "exact" and np.any(d < 2):
        raise ValueError(f"planted='exact' needs head_dim >= 2, got {head_dim!r}")
    d, bsz, m_arr = (v.astype(np.float64) for v in (d, bsz, m_arr))
    dmu_eff = mu_s + (m_arr - 1.0) * mu_c
    mean_diff = dmu_eff / bsz
    var_signal = (
        planted_token_variance(mu_s, d, planted)
        + (m_arr - 1.0) * planted_token_variance(mu_c, d, planted)
        + (bsz - m_arr) / d
    ) / bsz**2
    var_noise = 1.0 / (d * bsz)
    var_signal, var_noise = np.broadcast_arrays(np.asarray(var_signal, dtype=np.float64), var_noise)
    return BlockScoreModel(
        mean_diff=scalar_or_array(mean_diff),
        var_signal=scalar_or_array(np.array(var_signal)),
        var_noise=scalar_or_array(np.array(var_noise)),
        snr=scalar_or_array(mean_diff / np.sqrt(var_signal + var_noise)),
        sd_ratio=scalar_or_array(np.sqrt(var_signal / var_noise)),
        paper_snr=scalar_or_array(dmu_eff * np.sqrt(d / (2.0 * bsz))),
    )
