"""Small statistics shared by the simulators and the experiments."""

from __future__ import annotations

import numpy as np
from scipy.special import ndtri

from ._validate import broadcast, count, real, scalar_real

__all__ = ["wilson_interval", "interval_units"]


def wilson_interval(hits, trials, confidence: float = 0.95):
    r"""Wilson score interval for a binomial proportion.

    With :math:`\hat p = h/n` and :math:`z = \Phi^{-1}(1 - \alpha/2)`:

    .. math::
        \frac{\hat p + z^2/2n \pm z\sqrt{\hat p(1-\hat p)/n + z^2/4n^2}}{1 + z^2/n}

    Vectorised over ``hits`` and ``trials``. Returns ``(low, high)`` as float arrays (scalars in, 0-d
    arrays out). ``trials`` is a count (an integer >= 1); ``hits`` lies in [0, trials] and may be
    fractional (a sum of per-trial outcomes in [0, 1], such as attention mass kept); they broadcast
    together. ``confidence`` lies in (0, 1).

    Examples
    --------
    >>> from mobalab.stats import wilson_interval
    >>> low, high = wilson_interval(17, 100)
    >>> print(f"{low:.4f} {high:.4f}")
    0.1089 0.2555
    """
    confidence = scalar_real("confidence", confidence, low=0.0, high=1.0, low_open=True, high_open=True)
    h, n = (a.astype(np.float64) for a in broadcast(hits=real("hits", hits, low=0.0), trials=count("trials", trials)))
    if np.any(h > n):
        raise ValueError(f"hits must lie in [0, trials], got hits={hits}, trials={trials}")
    z = ndtri(0.5 + confidence / 2.0)
    p = h / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2.0 * n)) / denom
    half = z * np.sqrt(p * (1.0 - p) / n + z * z / (4.0 * n * n)) / denom
    # the closed form loses the exact end points to rounding; the interval must contain the estimate
    low = np.where(h == 0, 0.0, np.clip(centre - half, 0.0, p))
    high = np.where(h == n, 1.0, np.clip(centre + half, p, 1.0))
    return low, high


def interval_units(prediction, hits, trials, confidence: float = 0.95):
    r"""Signed distance of ``prediction`` from the Monte Carlo estimate, in units of the Wilson interval.

    .. math:: u = \frac{p_{\rm pred} - \hat p}{h},\qquad
              h = \begin{cases} \text{high} - \hat p & p_{\rm pred} \ge \hat p \\
                                \hat p - \text{low} & \text{otherwise} \end{cases}

    0 means the prediction equals the estimate; +-1 means it sits exactly on the upper / lower edge of
    the ``confidence`` interval; ``|u| > 1`` means it lies outside. The half-width on the side where the
    prediction lies is used, so the measure stays meaningful for skewed intervals near 0 and 1.

    Examples
    --------
    17 hits in 100 trials (estimate 0.17, 95 % interval 0.109 to 0.255): a prediction of 0.1 lies below the
    interval, 0.17 on the estimate, 0.25 inside, close to the upper edge:

    >>> from mobalab.stats import interval_units
    >>> print(interval_units([0.1, 0.17, 0.25], 17, 100).round(2))
    [-1.15  0.    0.94]
    """
    pred = real("prediction", prediction, low=0.0, high=1.0, allow_nan=True)
    lo, hi = wilson_interval(hits, trials, confidence)
    pred, h, n, lo, hi = broadcast(
        prediction=pred, hits=real("hits", hits, low=0.0), trials=count("trials", trials), lo=lo, hi=hi
    )
    est = h / n
    above = pred >= est
    half = np.where(above, hi - est, est - lo)
    diff = pred - est
    with np.errstate(divide="ignore", invalid="ignore"):
        outside_zero_width = np.where(diff == 0, 0.0, np.inf * np.sign(diff))
        return np.where(half > 0, diff / np.where(half > 0, half, 1.0), outside_zero_width)
