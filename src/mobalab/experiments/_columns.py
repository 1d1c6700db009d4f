"""Column types of the experiments' tidy tables, and the check that a table is one an experiment can draw."""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["integer_columns", "check_table"]


def integer_columns(df: pd.DataFrame, columns) -> pd.DataFrame:
    """``df`` with each of ``columns`` that it has as a nullable integer column (``Int64``).

    Concatenating legs with and without a column (analytic rows carry no ``hits`` or ``seed``) turns
    integers into floats with NaN; this turns them back, so that a CSV holds ``61759``, not ``61759.0``,
    and empty cells where a leg has no value. A column holding a non-integral number is an error.

    Examples
    --------
    >>> import pandas as pd
    >>> from mobalab.experiments._columns import integer_columns
    >>> df = pd.concat([pd.DataFrame({"seed": [3]}), pd.DataFrame({"x": [0.5]})], ignore_index=True)
    >>> integer_columns(df, ["seed"]).to_csv(index=False).splitlines()
    ['seed,x', '3,', ',0.5']
    """
    out = df.copy()
    for c in columns:
        if c not in out.columns:
            continue
        values = pd.to_numeric(out[c], errors="raise")
        finite = values.dropna().to_numpy(dtype=float)
        if not np.all(np.isfinite(finite)) or not np.all(finite == np.round(finite)):
            raise ValueError(f"column {c!r} holds non-integral values; it cannot be an integer column")
        out[c] = values.astype("Int64")
    return out


def check_table(df, experiment: str, what: str, columns) -> None:
    """ValueError unless ``df`` is a table of ``experiment`` with rows and every one of ``columns``.

    ``what`` names the caller ("plot", "summary") in the message. Without this a wrong or filtered-away table
    fails deep inside pandas or matplotlib (a KeyError naming one column, a division by zero) or yields a
    blank figure.

    Examples
    --------
    >>> import pandas as pd
    >>> from mobalab.experiments._columns import check_table
    >>> check_table(pd.DataFrame({"panel": []}), "demo", "plot", ["panel"])
    Traceback (most recent call last):
    ...
    ValueError: demo plot: the table has no rows (filtered to nothing?); nothing to draw
    """
    hint = "pass the DataFrame that run() returns or read_run reads back"
    if not isinstance(df, pd.DataFrame):
        raise ValueError(f"{experiment} {what} takes a pandas DataFrame, got {type(df).__name__}; {hint}")
    if "experiment" in df.columns:
        others = sorted(str(e) for e in pd.unique(df["experiment"].dropna()) if e != experiment)
        if others:
            raise ValueError(f"{experiment} {what}: the table holds rows of {', '.join(others)}, not of "
                             f"{experiment}; use that experiment's {what}")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{experiment} {what} needs the columns {missing}, which the table lacks (it has "
                         f"{list(df.columns)}); {hint}")
    if df.empty:
        action = "nothing to draw" if what == "plot" else "nothing to summarise"
        raise ValueError(f"{experiment} {what}: the table has no rows (filtered to nothing?); {action}")
