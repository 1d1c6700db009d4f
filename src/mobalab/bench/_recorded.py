"""Results recorded on reference machines, shipped with mobalab as package data in ``mobalab/bench/recorded/``.

File names start with the date, then the device and what was measured, and most end with the git commit
(``2026-11-22-h200-moba-forward-43ade7f.csv``). The forward and forward + backward benchmark CSVs (``*moba-*.csv``)
have a JSON beside them (same stem) that names the device, the date and the git commit; the other files carry
only what their name says.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

__all__ = ["recorded_dir", "recorded_files", "recorded_file", "find_csv"]


def recorded_dir() -> Path:
    """The folder of the recorded results inside the installed package.

    Examples
    --------
    >>> from mobalab.bench import recorded_dir
    >>> recorded_dir().name, recorded_dir().is_dir()
    ('recorded', True)
    """
    return Path(__file__).resolve().parent / "recorded"


def recorded_files(pattern: str = "*.csv") -> list[Path]:
    """Recorded files whose name matches the glob ``pattern``, sorted by name: by date, and files of one day by
    the rest of their name (for one device and measurement, the commit): not the order they were measured in.

    Parameters
    ----------
    pattern : str
        A glob pattern for the file name, e.g. ``"*moba-forward*.csv"``.

    Returns
    -------
    list of pathlib.Path
        Sorted by name; empty when nothing matches. The last is from the latest day, not necessarily the
        latest run of that day.

    Examples
    --------
    >>> from mobalab.bench import recorded_files
    >>> [p.name for p in recorded_files("*moba-forward*.csv")]
    ['2026-11-22-h200-moba-forward-43ade7f.csv']
    """
    if not isinstance(pattern, str) or not pattern:
        raise TypeError(f"pattern must be a non-empty glob string, got {pattern!r}")
    return sorted(recorded_dir().glob(pattern))


def recorded_file(name: str) -> Path:
    """The recorded file called ``name`` (the file name, with or without ``.csv``).

    Raises
    ------
    ValueError
        When no recorded file has that name; the message lists the recorded CSVs.

    Examples
    --------
    >>> from mobalab.bench import recorded_file
    >>> recorded_file("2026-11-22-h200-moba-fwdbwd-e4ca8e1").name
    '2026-11-22-h200-moba-fwdbwd-e4ca8e1.csv'
    """
    if not isinstance(name, str) or not name or "/" in name or "\\" in name:
        raise ValueError(f"name must be a recorded file's name (no folder), got {name!r}")
    base = recorded_dir()
    for candidate in (base / name, base / f"{name}.csv"):
        if candidate.is_file():
            return candidate
    names = ", ".join(p.name for p in recorded_files())
    raise ValueError(f"no recorded file {name!r} in {base}; recorded CSVs: {names}")


def find_csv(value, recorded: Callable[[], Path], what: str, how: str, pattern: str = "*.csv") -> Path:
    """The CSV that ``value`` names: an existing file, ``"recorded"`` (``recorded()``, the caller's own
    recorded CSV) or the name of a recorded file (:func:`recorded_file`).

    One resolution for every option that takes a benchmark CSV (``mobalab run --bench-csv``,
    ``mobalab design --bench-csv`` / ``--decode-bench-csv``), so that they all accept the same three forms.

    Parameters
    ----------
    value : str or os.PathLike
        What the user gave.
    recorded : callable
        Returns the recorded CSV that ``"recorded"`` stands for.
    what, how : str
        The error message's subject ("kernel-speed: benchmark CSV") and how to obtain such a CSV.
    pattern : str
        The recorded files the error message lists (a glob, :func:`recorded_files`).

    Raises
    ------
    TypeError
        When ``value`` is neither a string nor a path.
    FileNotFoundError
        When ``value`` is neither an existing file nor a recorded one; the message lists the recorded CSVs
        of ``pattern`` and says ``how`` to get one.

    Examples
    --------
    >>> from mobalab.bench import find_csv, recorded_file
    >>> newest = lambda: recorded_file("2026-11-22-h200-moba-fwdbwd-sweep.csv")
    >>> find_csv("recorded", newest, "benchmark CSV", "").name
    '2026-11-22-h200-moba-fwdbwd-sweep.csv'
    >>> find_csv("2026-11-22-h200-moba-forward-43ade7f", newest, "benchmark CSV", "").parent.name
    'recorded'
    >>> find_csv("no-such.csv", newest, "CSV", "measure one", "*forward*.csv")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    FileNotFoundError: CSV 'no-such.csv' does not exist (recorded CSVs: 2026-11-22-h200-moba-forward-...); measure one
    """
    if not isinstance(value, str | os.PathLike) or not str(value):
        raise TypeError(f"{what} must be a path, 'recorded' or a recorded CSV's name, got {value!r}")
    path = Path(value)
    if path.is_file():
        return path
    if str(value) == "recorded":
        return recorded()
    try:
        return recorded_file(str(value))
    except ValueError:
        pass
    names = ", ".join(p.name for p in recorded_files(pattern)) or "none"
    raise FileNotFoundError(f"{what} {str(value)!r} does not exist (recorded CSVs: {names}); {how}")
