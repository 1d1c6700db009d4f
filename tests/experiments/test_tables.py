"""plot and summary of every experiment refuse a table they cannot draw with a message that names the problem,
rather than a KeyError from deep inside pandas, a ZeroDivisionError or a blank figure."""

import pandas as pd
import pytest

from mobalab import experiments
from mobalab.experiments._columns import check_table

NAMES = experiments.names()


@pytest.mark.parametrize("what", ["plot", "summary"])
@pytest.mark.parametrize("name", NAMES)
def test_an_empty_frame_names_the_missing_columns(name, what):
    fn = getattr(experiments.get(name), what)
    with pytest.raises(ValueError, match=rf"{name} {what} needs the columns \[.*read_run"):
        fn(pd.DataFrame())


@pytest.mark.parametrize("what", ["plot", "summary"])
@pytest.mark.parametrize("name", NAMES)
def test_a_frame_filtered_to_no_rows_is_refused(name, what):
    mod = experiments.get(name)
    columns = getattr(mod, f"_{what.upper()}_COLUMNS")
    with pytest.raises(ValueError, match=rf"{name} {what}: the table has no rows"):
        getattr(mod, what)(pd.DataFrame({"experiment": pd.Series([], dtype=str), **{c: [] for c in columns}}))


@pytest.mark.parametrize("name", NAMES)
def test_another_experiments_table_is_named(name):
    other = "rope" if name != "rope" else "key-conv"
    with pytest.raises(ValueError, match=rf"holds rows of {other}, not of {name}; use that experiment's plot"):
        experiments.get(name).plot(pd.DataFrame({"experiment": [other]}))


def test_check_table_refuses_what_is_not_a_dataframe():
    with pytest.raises(ValueError, match=r"demo summary takes a pandas DataFrame, got dict"):
        check_table({"a": [1]}, "demo", "summary", ["a"])
    check_table(pd.DataFrame({"experiment": ["demo"], "a": [1]}), "demo", "summary", ["a"])
