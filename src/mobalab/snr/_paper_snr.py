r"""The paper's block-score model: effective signal, SNR, pairwise failure and the top-k rule.

A query looks for one signal key among N keys; E[q·k*] = mu_signal, E[q·k] = mu_noise otherwise, and m
keys of the signal block (k* included) carry mu_cluster. With per-dot-product variance sigma^2 the
difference D = s_signal_block - s_noise_block of two block scores (centroid = mean of B keys) has

.. math::
    \mathbb E[D] = \Delta\mu_{\rm eff}/B,\qquad \mathrm{Var}(D) = 2\sigma^2/B,\qquad
    \mathrm{SNR} = \frac{\Delta\mu_{\rm eff}}{\sigma\sqrt{2B}} = \Delta\mu_{\rm eff}\sqrt{d/2B}
    \ \ (\sigma^2 = 1/d).

The :math:`\sqrt{d/2B}` form assumes unit-norm, roughly isotropic q and k, so that the mu's are cosines
and sigma^2 = 1/d; Δμ is then held fixed *in cosine units* when d changes. For other units pass sigma.
"""

from __future__ import annotations

import numpy as np
from scipy.special import ndtr, ndtri

from .._validate import as_float, as_integer, scalar_or_array

__all__ = ["delta_mu_eff", "snr", "pairwise_failure", "paper_threshold"]


def delta_mu_eff(delta_mu, m=1, mu_cluster=0.0, mu_noise=0.0):
    r"""Effective signal of the signal block.

    .. math:: \Delta\mu_{\rm eff} = \Delta\mu + (m-1)(\mu_{\rm cluster} - \mu_{\rm noise})

    ``m`` counts the keys of the signal block with elevated similarity *including the needle itself*
    (``m = 1``: no clustering), so ``m >= 1``; it may be fractional (an effective count). Broadcasts
    over array arguments.
    """
    dmu = as_float("delta_mu", delta_mu)
    m_arr = as_float("m", m)
    if np.any(m_arr < 1):
        raise ValueError(f"m counts the needle itself and must be >= 1, got {m!r}")
    out = dmu + (m_arr - 1.0) * (as_float("mu_cluster", mu_cluster) - as_float("mu_noise", mu_noise))
    return scalar_or_array(out)


def snr(d, block_size, delta_mu_eff, sigma=None):
    r"""The paper's signal-to-noise ratio of the signal block against one noise block.

    .. math:: \mathrm{SNR} = \frac{\Delta\mu_{\rm eff}}{\sigma\sqrt{2B}},\qquad
              \sigma = 1/\sqrt d \text{ by default} \Rightarrow \mathrm{SNR} = \Delta\mu_{\rm eff}\sqrt{d/2B}

    ``d`` (head dim) and ``block_size`` (B) must be positive; ``sigma`` (per-dot-product standard
    deviation), when given, must be positive and replaces 1/sqrt(d) (``d`` is then only validated).
    Halving B multiplies the SNR by sqrt(2). Broadcasts over array arguments.
    """
    d_arr = as_float("d", d)
    if np.any(d_arr <= 0):
        raise ValueError(f"d (head dim) must be positive, got {d!r}")
    b_arr = as_float("block_size", block_size)
    if np.any(b_arr <= 0):
        raise ValueError(f"block_size must be positive, got {block_size!r}")
    if sigma is None:
        sig = 1.0 / np.sqrt(d_arr)
    else:
        sig = as_float("sigma", sigma)
        if np.any(sig <= 0):
            raise ValueError(f"sigma must be positive, got {sigma!r}")
    out = as_float("delta_mu_eff", delta_mu_eff) / (sig * np.sqrt(2.0 * b_arr))
    return scalar_or_array(out)


def pairwise_failure(snr):
    r"""Probability that one given noise block outranks the signal block: :math:`p = \Phi(-\mathrm{SNR})`.

    Exact in the Gaussian model for D ~ N(E D, Var D) with SNR = E D / sqrt(Var D), whatever the split of
    Var D between the two blocks.
    """
    return scalar_or_array(ndtr(-as_float("snr", snr)))


def paper_threshold(n_blocks, top_k):
    r"""The paper's top-k rule: retrieval is called reliable when :math:`\mathrm{SNR} > \Phi^{-1}(1 - k/n)`.

    It is the expected-count condition p < k/n, not a probability of success (at the threshold the
    exact hit probability is typically only 30-70 %; see :func:`hit_probability`). Computed as
    :math:`-\Phi^{-1}(k/n)` so small k/n keeps full precision. For ``top_k >= n_blocks`` every block is
    selected and any SNR suffices: the threshold is ``-inf``. ``n_blocks >= 1`` and ``top_k >= 1``,
    integer-valued; broadcasts.
    """
    n = as_integer("n_blocks", n_blocks, 1)
    k = as_integer("top_k", top_k, 1)
    ratio = np.minimum(k / n, 1.0)
    return scalar_or_array(-ndtri(ratio))
