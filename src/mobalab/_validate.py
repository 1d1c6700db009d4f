"""Input checks shared by the analytic model: each raises ValueError naming what was given."""

from __future__ import annotations

import numpy as np


def _describe(value) -> str:
    arr = np.asarray(value)
    if arr.ndim == 0:
        return repr(arr.item()) if arr.dtype != object else repr(value)
    return f"array of shape {arr.shape}"


def as_float(name: str, value, *, allow_nonfinite: bool = False) -> np.ndarray:
    """``value`` as a float64 array; non-numeric or (unless allowed) non-finite input raises."""
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a real number or array of them, got {value!r}") from exc
    if not allow_nonfinite and not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite, got {_describe(value)} containing non-finite values")
    return arr


def as_integer(name: str, value, minimum: int) -> np.ndarray:
    """``value`` as an integer-valued float64 array with every element ``>= minimum``.

    Kept in float64 because it feeds special functions; integer-valued floats (``8.0``) are accepted.
    """
    arr = as_float(name, value)
    if not np.all(arr == np.round(arr)):
        raise ValueError(f"{name} must be integer-valued, got {_describe(value)}")
    if np.any(arr < minimum):
        bad = arr[arr < minimum].flat[0]
        raise ValueError(f"{name} must be >= {minimum}, got {bad:g}")
    return arr


def as_int(name: str, value, minimum: int) -> int:
    """A scalar integer ``>= minimum`` (arrays are refused)."""
    arr = as_integer(name, value, minimum)
    if arr.ndim != 0:
        raise ValueError(f"{name} must be a scalar integer, got {_describe(value)}")
    return int(arr)


def as_probability_open(name: str, value) -> np.ndarray:
    """A float array with every element strictly inside (0, 1)."""
    arr = as_float(name, value, allow_nonfinite=True)
    if not np.all((arr > 0.0) & (arr < 1.0)):
        raise ValueError(f"{name} must lie strictly between 0 and 1, got {_describe(value)}")
    return arr


def as_sd_ratio(value) -> np.ndarray:
    """sd_ratio = sigma_signal / sigma_noise: finite and >= 0 (0 = deterministic signal-block score)."""
    arr = as_float("sd_ratio", value)
    if np.any(arr < 0.0):
        raise ValueError(f"sd_ratio must be >= 0 (sigma_signal / sigma_noise), got {_describe(value)}")
    return arr


def scalar_or_array(arr: np.ndarray):
    """0-d arrays become Python floats; anything else is returned as is."""
    return float(arr) if np.ndim(arr) == 0 else arr
