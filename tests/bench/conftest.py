"""Fixtures of the benchmark tests."""

import importlib.util
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


@pytest.fixture(scope="module")
def script(request):
    """The module of ``scripts/<SCRIPT_NAME>.py``, SCRIPT_NAME set by the test module (scripts/ is not a package, so
    each script is loaded from its file)."""
    name = request.module.SCRIPT_NAME
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
