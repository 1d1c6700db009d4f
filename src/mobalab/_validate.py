"""Argument checks shared by :mod:`mobalab.snr`, :mod:`mobalab.simulate` and :mod:`mobalab.stats`.

One rule set for the whole library:

* a **count** (head dim, block size, number of blocks, top-k, m, trials, a position) is an integer: a
  Python or numpy integer, an integer-valued float (``8.0``) or an array of them; never a bool, a string
  or None;
* a **real** is a finite number or an array of them (bools refused); bounds are stated per argument;
* a **cosine** (mu_signal, mu_noise, mu_cluster, mu) is a real in [-1, 1];
* arguments that broadcast together are checked together, and a mismatch names every argument and its
  shape;
* an allocation that one call would need at once is checked against the machine's memory before it is
  attempted (:func:`check_memory`).

The wrong kind of value (a string, a bool, None, a complex number) raises TypeError; a value of the right
kind that is not supported raises ValueError. Every message names the argument, what was given and what
is supported.
"""

from __future__ import annotations

import math
import os

import numpy as np

# Largest count accepted: far beyond any real configuration, and exact in float64 and int64.
_COUNT_MAX = 2**53
# Share of the machine's (or GPU's) memory that one call may ask for at once.
_MEMORY_FRACTION = 0.5
_MEMORY_FALLBACK = 8 << 30


def _given(value) -> str:
    """Short description of a value for messages: its repr, or the shape of an array."""
    if isinstance(value, np.ndarray) and value.ndim > 0:
        return f"an array of shape {value.shape}"
    if isinstance(value, list | tuple) and len(value) > 6:
        return f"a {type(value).__name__} of length {len(value)}"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _has_bool(value) -> bool:
    if isinstance(value, bool | np.bool_):
        return True
    if isinstance(value, list | tuple):
        return any(_has_bool(v) for v in value)
    return False


def _numeric(name: str, value, kind: str) -> np.ndarray:
    """``value`` as an array of integers or floats; TypeError for any other kind of value."""
    if value is None or isinstance(value, str | bytes) or _has_bool(value):
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__} {_given(value)}")
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError) as exc:  # ragged nested sequences
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__} {_given(value)}") from exc
    if arr.dtype.kind not in "iuf":
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__} {_given(value)} of dtype {arr.dtype}")
    return arr


def _first(arr: np.ndarray, bad: np.ndarray):
    """The first offending element, for messages."""
    x = arr[bad].flat[0] if arr.ndim else arr[()]
    return x.item() if hasattr(x, "item") else x


def _where(arr: np.ndarray) -> str:
    return "" if arr.ndim == 0 else f" (in an array of shape {arr.shape})"


def real(
    name: str,
    value,
    *,
    low=None,
    high=None,
    low_open: bool = False,
    high_open: bool = False,
    allow_nan: bool = False,
    _single: bool = False,
) -> np.ndarray:
    """``value`` as a float64 array of finite numbers within the given bounds (closed unless ``*_open``)."""
    lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
    hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
    if low is not None and high is not None:
        bounds = f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    else:
        bounds = f" {lo or hi}" if lo or hi else ""
    kind = f"a real number{bounds}" + ("" if _single else " or an array of them")
    arr = _numeric(name, value, kind).astype(np.float64, copy=False)
    bad = np.isinf(arr) if allow_nan else ~np.isfinite(arr)
    if np.any(bad):
        raise ValueError(f"{name} must be finite, got {_first(arr, bad)!r}{_where(arr)}")
    with np.errstate(invalid="ignore"):
        bad = np.zeros(arr.shape, dtype=bool)
        if low is not None:
            bad |= (arr <= low) if low_open else (arr < low)
        if high is not None:
            bad |= (arr >= high) if high_open else (arr > high)
    if np.any(bad):
        raise ValueError(f"{name} must be{bounds}, got {_first(arr, bad)!r}{_where(arr)}")
    return arr


def cosine(name: str, value, *, _single: bool = False) -> np.ndarray:
    """A cosine (or an array of them): a real in [-1, 1]."""
    arr = real(name, value, _single=_single)
    bad = np.abs(arr) > 1.0
    if np.any(bad):
        raise ValueError(f"{name} is a cosine and must lie in [-1, 1], got {_first(arr, bad)!r}{_where(arr)}")
    return arr


def count(name: str, value, minimum: int | None = 1, *, _single: bool = False) -> np.ndarray:
    """An integer count ``>= minimum`` (or an array of them) as an int64 array; ``minimum=None``: any integer."""
    kind = "an integer" if minimum is None else f"an integer >= {minimum}"
    arr = _numeric(name, value, kind + ("" if _single else " or an array of them"))
    if arr.dtype.kind == "f":
        bad = ~np.isfinite(arr) | (arr != np.round(arr))
        if np.any(bad):
            raise ValueError(f"{name} must be {kind}, got {_first(arr, bad)!r}{_where(arr)}")
    too_big = np.abs(arr) > _COUNT_MAX
    if np.any(too_big):
        raise ValueError(f"{name} must be at most 2**53 in magnitude, got {_first(arr, too_big)!r}{_where(arr)}")
    if minimum is not None:
        bad = arr < minimum
        if np.any(bad):
            raise ValueError(f"{name} must be {kind}, got {_first(arr, bad)!r}{_where(arr)}")
    return arr.astype(np.int64)


def _scalar(name: str, arr: np.ndarray, value, kind: str) -> None:
    if arr.ndim != 0:
        raise ValueError(f"{name} must be a single {kind}, got {_given(value)}")


def scalar_count(name: str, value, minimum: int | None = 1) -> int:
    """One integer ``>= minimum`` (arrays refused) as a Python int; ``minimum=None``: any integer."""
    arr = count(name, value, minimum, _single=True)
    _scalar(name, arr, value, "integer" if minimum is None else f"integer >= {minimum}")
    return int(arr)


def scalar_real(name: str, value, **bounds) -> float:
    """One finite real (arrays refused) as a Python float; ``bounds`` as in :func:`real`."""
    arr = real(name, value, _single=True, **bounds)
    _scalar(name, arr, value, "real number")
    return float(arr)


def rope_base(value) -> float:
    """A RoPE wavelength base: one finite real > 1 (θ_i = base^(-2i/d) must decrease with i)."""
    return scalar_real("base", value, low=1.0, low_open=True)


def scalar_cosine(name: str, value) -> float:
    """One cosine in [-1, 1] as a Python float."""
    arr = cosine(name, value, _single=True)
    _scalar(name, arr, value, "cosine")
    return float(arr)


def default_mu_cluster(delta_mu: float, mu_noise: float) -> float:
    """The clustered keys' cosine when none is given: ``mu_noise + delta_mu`` (as similar as the needle);
    ValueError naming both inputs when ``mu_noise`` is no cosine or the sum lies outside [-1, 1]."""
    mu_noise = scalar_cosine("mu_noise", mu_noise)
    mu_cluster = mu_noise + float(delta_mu)
    if not -1.0 <= mu_cluster <= 1.0:
        raise ValueError(f"mu_cluster defaults to mu_noise + delta_mu = {mu_noise:g} + {float(delta_mu):g} = "
                         f"{mu_cluster:g}, outside [-1, 1]: give mu_cluster, or a needle cosine "
                         "mu_noise + delta_mu in [-1, 1]")
    return mu_cluster


def probability(name: str, value) -> np.ndarray:
    """A target probability strictly inside (0, 1) (or an array of them)."""
    return real(name, value, low=0.0, high=1.0, low_open=True, high_open=True)


def choice(name: str, value, choices) -> str:
    """One of ``choices`` (strings)."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {_given(value)}")
    return value


def flag(name: str, value) -> bool:
    """True or False (a Python or numpy bool; 0 and 1 are refused)."""
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {_given(value)}")
    return bool(value)


def broadcast(**arrays: np.ndarray) -> list[np.ndarray]:
    """The arrays broadcast to one shape; ValueError naming each argument's shape when they do not fit."""
    try:
        return list(np.broadcast_arrays(*arrays.values()))
    except ValueError:
        shapes = ", ".join(f"{k} {np.shape(v)}" for k, v in arrays.items())
        raise ValueError(
            f"arguments of incompatible shapes: {shapes}; they broadcast together, so give scalars or arrays "
            f"of shapes that broadcast (numpy rules)"
        ) from None


def scalar_or_array(arr: np.ndarray):
    """0-d arrays become Python floats; anything else is returned as is."""
    return float(arr) if np.ndim(arr) == 0 else arr


def format_bytes(nbytes: float) -> str:
    units = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]
    i = 0 if nbytes < 1024 else min(int(math.log(nbytes, 1024)), len(units) - 1)
    return f"{nbytes / 1024**i:.3g} {units[i]}"


def memory_limit(device=None) -> int:
    """Bytes that one call may allocate at once: half the memory of the machine, or of the CUDA ``device``."""
    total = None
    if device is not None and getattr(device, "type", None) == "cuda":
        import torch

        total = torch.cuda.get_device_properties(device).total_memory
    else:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (AttributeError, ValueError, OSError):
            total = None
    return int(_MEMORY_FRACTION * total) if total else _MEMORY_FALLBACK


def check_memory(what: str, nbytes: float, instead: str, device=None) -> None:
    """Refuse, before allocating, a request for more than :func:`memory_limit` bytes.

    ``what`` says what would be allocated, ``instead`` what the caller can do instead.
    """
    limit = memory_limit(device)
    if nbytes > limit:
        raise ValueError(
            f"{what} needs {format_bytes(nbytes)} of memory at once, more than the {format_bytes(limit)} "
            f"allowed here (half of this {'GPU' if getattr(device, 'type', None) == 'cuda' else 'machine'}'s "
            f"memory); {instead}"
        )
