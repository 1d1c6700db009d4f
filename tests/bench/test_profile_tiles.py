"""scripts/profile_tiles.py on the CPU: a malformed --build-option is refused before any GPU work (the profile
itself needs a GPU and Nsight Compute)."""

import pytest

SCRIPT_NAME = "profile_tiles"  # the conftest's `script` fixture loads it


def test_a_malformed_build_option_is_refused_with_the_accepted_form(script, capsys):
    with pytest.raises(SystemExit):
        script.main(["--build-option", "nosuch.cu:MOBA_X=1"])
    assert "SOURCE.cu:MOBA_NAME=INTEGER" in capsys.readouterr().err
