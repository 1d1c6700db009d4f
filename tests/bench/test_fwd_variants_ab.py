"""scripts/fwd_variants_ab.py on the CPU: its points, variants and refusals (the timing needs a GPU)."""

import pytest

SCRIPT_NAME = "fwd_variants_ab"  # the conftest's `script` fixture loads it


@pytest.fixture(scope="module")
def ab(script):
    return script


def test_points_and_variants_are_checked_before_any_gpu_work(ab, capsys):
    for argv, says in ((["--points", "3M"], "invalid choice"), (["--variants", "fast"], "'fast' is not base or one of"),
                       (["--variants", "base+UNROLL=2"], "neither MOBA_NAME=INTEGER nor budget=MIB"),
                       (["--variants", "wgmma+budget=0"], "is not budget=MIB"),
                       (["--kv-heads", "3"], "must divide the 16 query heads"),
                       (["--rounds", "2"], "at least 3"), (["--top-k", "0"], "--top-k must be in 1..64"),
                       (["--top-k", "65"], "got 65")):
        with pytest.raises(SystemExit):
            ab.main(argv)
        assert says in capsys.readouterr().err


def test_variants_name_a_tile_kernel_build_options_and_a_budget(ab):
    assert ab.parse_variant("base") == (None, (), None)
    assert ab.parse_variant("wgmma") == ("wgmma", (), None)
    assert ab.parse_variant("resident+MOBA_X=-1") == ("resident", ("MOBA_X=-1",), None)
    assert ab.parse_variant("MOBA_FWD_MINB_SMALL_KT=0+MOBA_FWD_ROLLED_GATHER=0") == (
        None, ("MOBA_FWD_MINB_SMALL_KT=0", "MOBA_FWD_ROLLED_GATHER=0"), None)
    assert ab.parse_variant("budget=1536") == (None, (), 1536 << 20)
    assert ab.parse_variant("wgmma+MOBA_X=1+budget=64") == ("wgmma", ("MOBA_X=1",), 64 << 20)


def test_points_are_shapes_the_forward_runs(ab):
    from mobalab.kernels._contract import CUDA_BLOCK_SIZES

    assert all(n % 1024 == 0 and block in CUDA_BLOCK_SIZES for n, block in ab.POINTS.values())


def test_without_a_gpu_it_says_so(ab, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ab.main(["--points", "8K"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
