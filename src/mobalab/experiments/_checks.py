"""Checks shared by the experiments' ``run`` functions."""

from __future__ import annotations

import numbers

__all__ = ["check_seed", "is_count", "check_counts"]

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


def check_counts(config, *names: str) -> None:
    """ValueError naming the first of the fields ``names`` of ``config`` that is not an integer >= 1.

    Examples
    --------
    >>> from types import SimpleNamespace
    >>> from mobalab.experiments._checks import check_counts
    >>> check_counts(SimpleNamespace(trials=10, batch_size=0), "trials", "batch_size")
    Traceback (most recent call last):
    ...
    ValueError: batch_size must be an integer >= 1, got 0
    """
    for name in names:
        value = getattr(config, name)
        if not is_count(value):
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
