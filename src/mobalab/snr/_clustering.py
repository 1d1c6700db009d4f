r"""Within-block clustering as a multiplier on the signal.

See docs/design.md, "Clustering and key convolution".

With ρ = (mu_cluster - mu_noise) / Δμ the effective signal is

.. math::
    \Delta\mu_{\rm eff} = \Delta\mu + (m-1)(\mu_{\rm cluster} - \mu_{\rm noise})
    = \Delta\mu\,[1 + (m-1)\rho],

so m - 1 clustered keys multiply Δμ_eff, and with it the SNR (∝ Δμ_eff/sqrt(B)), by 1 + (m-1)ρ.
Reaching the same SNR gain by shrinking the block instead needs B smaller by the *square* of that
factor, because SNR grows only as 1/sqrt(B): clustering with m = 4, ρ = 1 is worth a 16x smaller block.
"""

from __future__ import annotations

import numpy as np

from .._validate import broadcast, cosine, real, scalar_or_array

__all__ = ["cluster_rho", "clustering_multiplier"]


def cluster_rho(delta_mu, mu_cluster, mu_noise=0.0):
    r"""Relative affinity of the clustered keys: :math:`\rho = (\mu_c - \mu_{\rm noise})/\Delta\mu`.

    .. math:: \rho = \frac{\mu_{\rm cluster} - \mu_{\rm noise}}{\Delta\mu}

    ρ = 1 when clustered keys are as similar to the query as the needle, 0 when they are plain noise.
    ``delta_mu`` must be non-zero. Broadcasts.

    Examples
    --------
    >>> from mobalab import snr
    >>> print(snr.cluster_rho(0.5, 0.5), round(snr.cluster_rho(0.4, 0.3, mu_noise=0.1), 6))
    1.0 0.5
    """
    dmu, mu_c, mu_n = broadcast(
        delta_mu=real("delta_mu", delta_mu), mu_cluster=cosine("mu_cluster", mu_cluster),
        mu_noise=cosine("mu_noise", mu_noise),
    )
    if np.any(dmu == 0.0):
        raise ValueError(f"delta_mu must be non-zero (rho divides by it), got {delta_mu!r}")
    return scalar_or_array((mu_c - mu_n) / dmu)


def clustering_multiplier(m, rho):
    r"""Factor by which clustering multiplies Δμ_eff and the SNR: :math:`1 + (m-1)\rho`.

    .. math:: \frac{\Delta\mu_{\rm eff}}{\Delta\mu} = 1 + (m - 1)\rho

    Δμ_eff = Δμ · multiplier, so SNR scales by the same factor; shrinking B gives the same SNR gain
    only if B shrinks by multiplier² (SNR ∝ 1/sqrt(B)). ``m >= 1`` counts the needle (may be an
    effective, fractional count). Broadcasts.

    Examples
    --------
    Three companions as close to the query as the needle (m = 4, ρ = 1) quadruple the SNR, as much as a
    block 16 times smaller:

    >>> from mobalab import snr
    >>> print(snr.clustering_multiplier(4, 1.0))
    4.0
    >>> print(round(snr.snr(64, 512, 0.5 * 4.0) / snr.snr(64, 512 // 16, 0.5), 6))
    1.0
    """
    m_arr, rho_arr = broadcast(m=real("m", m, low=1.0), rho=real("rho", rho))
    return scalar_or_array(1.0 + (m_arr - 1.0) * rho_arr)
