"""scripts/bench_router.py on the CPU: variant names (with build options after "+") are checked before any GPU
work."""

import pytest

SCRIPT_NAME = "bench_router"  # the conftest's `script` fixture loads it


@pytest.fixture(scope="module")
def br(script):
    return script


@pytest.mark.parametrize("variants", ["fast", "mma,fast+MOBA_X=1"])
def test_unknown_variants_are_refused(br, capsys, variants):
    with pytest.raises(SystemExit):
        br.main(["--variants", variants])
    assert "unknown" in capsys.readouterr().err
