"""scripts/decode_split_ab.py on the CPU: its variant syntax and its refusals (the timing needs a GPU)."""

import pytest

SCRIPT_NAME = "decode_split_ab"  # the conftest's `script` fixture loads it


@pytest.fixture(scope="module")
def ab(script):
    return script


def test_variants_name_split_launches_overrides(ab):
    assert ab.parse_variant("plan") == {}
    assert ab.parse_variant("attn_ctas=8,select_wpr=4") == {"attn_ctas": 8, "select_wpr": 4}
    assert ab.parse_variant("range_blocks=512") == {"range_blocks": 512}
    assert ab.parse_variant("page_size=128") == {"page_size": 128}  # a paged copy of the cache
    for bad in ("attn=8", "attn_ctas=x", "attn_ctas"):
        with pytest.raises(ValueError, match="want KNOB=INT"):
            ab.parse_variant(bad)


def test_points_are_checked_before_any_gpu_work(ab, capsys):
    with pytest.raises(SystemExit):
        ab.main(["--points", "3M"])
    assert "unknown points ['3M']" in capsys.readouterr().err
    assert set(ab.POINTS) >= {"512K", "128K-B64k4", "32K"}


def test_without_a_gpu_it_says_so(ab, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ab.main(["--points", "32K"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
