r"""The paper's block-score model: effective signal, SNR, pairwise failure and the top-k rule.

See docs/design.md, "SNR".

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

from .._validate import broadcast, cosine, count, real, scalar_or_array

__all__ = ["delta_mu_eff", "snr", "pairwise_failure", "paper_threshold"]


def delta_mu_eff(delta_mu, m=1, mu_cluster=0.0, mu_noise=0.0):
    r"""Effective signal of the signal block.

    .. math:: \Delta\mu_{\rm eff} = \Delta\mu + (m-1)(\mu_{\rm cluster} - \mu_{\rm noise})

    ``delta_mu`` = mu_signal - mu_noise (a real). ``m`` counts the keys of the signal block with elevated
    similarity *including the needle itself* (``m = 1``: no clustering), so ``m >= 1``; it may be
    fractional (an effective count). ``mu_cluster`` and ``mu_noise`` are cosines in [-1, 1]. Broadcasts
    over array arguments.

    Examples
    --------
    Two companions of the needle with cosine 0.5 each (m = 3) triple a needle of cosine 0.5:

    >>> from mobalab import snr
    >>> print(snr.delta_mu_eff(0.5, m=3, mu_cluster=0.5))
    1.5
    """
    dmu, m_arr, mu_c, mu_n = broadcast(
        delta_mu=real("delta_mu", delta_mu),
        m=real("m", m, low=1.0),
        mu_cluster=cosine("mu_cluster", mu_cluster),
        mu_noise=cosine("mu_noise", mu_noise),
    )
    return scalar_or_array(dmu + (m_arr - 1.0) * (mu_c - mu_n))


def snr(d, block_size, delta_mu_eff, sigma=None):
    r"""The paper's signal-to-noise ratio of the signal block against one noise block.

    .. math:: \mathrm{SNR} = \frac{\Delta\mu_{\rm eff}}{\sigma\sqrt{2B}},\qquad
              \sigma = 1/\sqrt d \text{ by default} \Rightarrow \mathrm{SNR} = \Delta\mu_{\rm eff}\sqrt{d/2B}

    ``d`` (head dim) and ``block_size`` (B) are integers >= 1; ``sigma`` (per-dot-product standard
    deviation), when given, must be positive and replaces 1/sqrt(d) (``d`` is then only validated).
    Halving B multiplies the SNR by sqrt(2). Broadcasts over array arguments.

    Examples
    --------
    A needle with Δμ_eff = 2 at head dim 64 and block size 32; halving the block multiplies the SNR by √2:

    >>> from mobalab import snr
    >>> print(round(snr.snr(d=64, block_size=32, delta_mu_eff=2.0), 3))
    2.0
    >>> print(round(snr.snr(d=64, block_size=16, delta_mu_eff=2.0), 3))
    2.828
    """
    d_arr = count("d", d)
    sig = 1.0 / np.sqrt(d_arr) if sigma is None else real("sigma", sigma, low=0.0, low_open=True)
    d_arr, b_arr, dmu, sig = broadcast(
        d=d_arr, block_size=count("block_size", block_size), delta_mu_eff=real("delta_mu_eff", delta_mu_eff),
        sigma=sig,
    )
    return scalar_or_array(dmu / (sig * np.sqrt(2.0 * b_arr)))


def pairwise_failure(snr):
    r"""Probability that one given noise block outranks the signal block: :math:`p = \Phi(-\mathrm{SNR})`.

    .. math:: p = P(D < 0) = \Phi(-\mathrm{SNR}),\qquad D \sim \mathcal N(\mathbb E D, \mathrm{Var}\,D),\quad
              \mathrm{SNR} = \mathbb E D / \sqrt{\mathrm{Var}\,D}

    Exact in the Gaussian model, whatever the split of Var D between the two blocks.

    Examples
    --------
    >>> from mobalab import snr
    >>> print(f"{snr.pairwise_failure(2.0):.4f}")
    0.0228
    """
    return scalar_or_array(ndtr(-real("snr", snr)))


def paper_threshold(n_blocks, top_k):
    r"""The paper's top-k rule: retrieval is called reliable when :math:`\mathrm{SNR} > \Phi^{-1}(1 - k/n)`.

    .. math:: \mathrm{SNR} > \Phi^{-1}(1 - k/n) = -\Phi^{-1}(k/n)

    It is the expected-count condition p < k/n, not a probability of success: at the threshold the
    exact hit probability (:func:`hit_probability`) grows with n, from 0.5 for the top 1 of 2 blocks
    through 0.64 for the top 2 of 16, 0.86 for the top 8 of 2048 and 0.94 for the top 8 of 131072 to
    0.96 for the top 1 of 10^6. Computed as
    :math:`-\Phi^{-1}(k/n)` so small k/n keeps full precision. For ``top_k >= n_blocks`` every block is
    selected and any SNR suffices: the threshold is ``-inf``. ``n_blocks >= 1`` and ``top_k >= 1``,
    integer-valued; broadcasts.

    Examples
    --------
    The top 8 of 2048 blocks (64K tokens in blocks of 32):

    >>> from mobalab import snr
    >>> print(f"{snr.paper_threshold(2048, 8):.3f}")
    2.660
    >>> print(f"{snr.hit_probability(snr.paper_threshold(2048, 8), 2048, 8):.3f}")
    0.859
    """
    n, k = broadcast(n_blocks=count("n_blocks", n_blocks), top_k=count("top_k", top_k))
    ratio = np.minimum(k / n, 1.0)
    return scalar_or_array(0.0 - ndtri(ratio))  # 0 - x, not -x: k/n = 1/2 gives 0.0, not -0.0
