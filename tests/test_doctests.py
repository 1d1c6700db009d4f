"""Every Examples section in mobalab's docstrings, and the README's API lines, run as doctests.

The modules are imported the normal way (once, from the installed package) and their docstrings handed to
doctest; pytest's own ``--doctest-modules`` would execute some modules a second time, which re-registers
the torch custom ops defined in them.
"""

import doctest
import importlib
import importlib.util
import pkgutil
from pathlib import Path

import pytest

import mobalab

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(
    m.name
    for m in pkgutil.walk_packages(mobalab.__path__, "mobalab.")
    # __main__ modules run a program when imported
    if not m.name.endswith("__main__")
)
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _optional_missing(name: str) -> str | None:
    for extra in ("transformers",):
        if name.rsplit(".", 1)[-1].lstrip("_").startswith(extra) and importlib.util.find_spec(extra) is None:
            return extra
    return None


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    if (missing := _optional_missing(name)) is not None:
        pytest.skip(f"{missing} is not installed")
    module = importlib.import_module(name)
    tests = [t for t in doctest.DocTestFinder().find(module, name) if t.examples]
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    for t in tests:
        runner.run(t)
    assert runner.failures == 0, f"{runner.failures} doctest example(s) failed in {name} (output above)"


def test_readme_examples():
    result = doctest.testfile(str(ROOT / "README.md"), module_relative=False, optionflags=FLAGS)
    assert result.attempted > 0, "README.md has no examples"
    assert result.failed == 0
