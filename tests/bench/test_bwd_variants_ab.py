"""scripts/bwd_variants_ab.py on the CPU: its points, variants and refusals (the timing needs a GPU)."""

import pytest

SCRIPT_NAME = "bwd_variants_ab"  # the conftest's `script` fixture loads it


@pytest.fixture(scope="module")
def ab(script):
    return script


def test_points_and_variants_are_checked_before_any_gpu_work(ab, capsys):
    from mobalab.kernels._cuda_backward import BWD_VARIANTS, block_supported, wgmma_supported

    for argv, says in ((["--points", "3M"], "invalid choice"), (["--variants", "fast"], "'fast' is not one of"),
                       (["--variants", "block+UNROLL=2"], "is not MOBA_NAME=INTEGER")):
        with pytest.raises(SystemExit):
            ab.main(argv)
        assert says in capsys.readouterr().err
    # every point is a shape "tile" and "block" run (the "block" variant: head dims 64, 128 at B 128), the d 128 points
    # also "wgmma"
    assert all(block_supported(dim, 128) for _, dim, _ in ab.POINTS.values())
    assert all(wgmma_supported(dim, 128) == (dim == 128) for _, dim, _ in ab.POINTS.values())
    assert set(BWD_VARIANTS) == {"auto", "tile", "block", "wgmma"}


def test_without_a_gpu_it_says_so(ab, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ab.main(["--points", "8K"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_variants_carry_build_options(ab):
    """``block+MOBA_BWD_DQ_UNROLL=2``: the "block" variant with that define added to every backward launch
    (mobalab.bench._interleaved.extra_defines, tested in test_interleaved.py)."""
    assert ab.parse_variant("tile") == ("tile", ())
    assert ab.variant_source("wgmma") == "attention_bwd_wgmma.cu"
    assert ab.variant_source("block") == ab.variant_source("tile") == "attention_bwd.cu"
    assert ab.parse_variant("block+MOBA_BWD_DQ_UNROLL=2+MOBA_X=-1") == ("block", ("MOBA_BWD_DQ_UNROLL=2", "MOBA_X=-1"))
