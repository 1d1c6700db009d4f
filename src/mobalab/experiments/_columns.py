"""Column types of the experiments' tidy tables."""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["integer_columns"]


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
