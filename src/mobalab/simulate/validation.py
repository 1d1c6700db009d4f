"""Argument checks shared by the simulators: ValueError naming what was given and what is allowed."""

from __future__ import annotations

import math
import numbers

import numpy as np

__all__ = ["check_int", "check_float", "check_choice", "check_progress"]


def check_int(name: str, value, minimum: int | None = None) -> int:
    """``value`` as a Python int (bools and non-integral numbers refused), at least ``minimum``."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_float(name: str, value, low: float | None = None, high: float | None = None) -> float:
    """``value`` as a finite Python float within ``[low, high]`` (either bound optional)."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value


def check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")
    return value


def check_progress(progress) -> bool:
    if not isinstance(progress, bool | np.bool_):
        raise ValueError(f"progress must be True or False, got {progress!r}")
    return bool(progress)
