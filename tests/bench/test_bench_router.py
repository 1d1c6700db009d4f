"""scripts/bench_router.py on the CPU: variant names (with build options after "+") are checked before any GPU
work."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_router.py"


@pytest.fixture(scope="module")
def br():
    spec = importlib.util.spec_from_file_location("bench_router", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("variants", ["fast", "mma,fast+MOBA_X=1"])
def test_unknown_variants_are_refused(br, capsys, variants):
    with pytest.raises(SystemExit):
        br.main(["--variants", variants])
    assert "unknown" in capsys.readouterr().err
