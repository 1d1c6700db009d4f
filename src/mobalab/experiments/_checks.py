"""Checks shared by the experiments' ``run`` functions."""

from __future__ import annotations

import numbers

__all__ = ["check_seed", "is_count"]

SEED_MAX = 2**63 - 1  # the seed is written to the CSV as a 64-bit integer column


def check_seed(seed) -> int:
    """``seed`` as an int, or ValueError naming ``seed`` when it is not an integer in [0, 2**63 - 1].

    Examples
    --------
    >>> from mobalab.experiments._checks import check_seed
    >>> check_seed(7)
    7
    >>> check_seed(-1)
    Traceback (most recent call last):
    ...
    ValueError: seed must be an integer from 0 to 2**63 - 1, got -1
    """
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed <= SEED_MAX:
        raise ValueError(f"seed must be an integer from 0 to 2**63 - 1, got {seed!r}")
    return int(seed)


def is_count(value) -> bool:
    """Whether ``value`` is an integer >= 1 (numpy integers included, bool not).

    Examples
    --------
    >>> from mobalab.experiments._checks import is_count
    >>> is_count(3), is_count(0), is_count(True), is_count(2.0)
    (True, False, False, False)
    """
    return not isinstance(value, bool) and isinstance(value, numbers.Integral) and value >= 1
