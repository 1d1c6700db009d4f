"""scripts/bwd_variants_ab.py on the CPU: its points, variants and refusals (the timing needs a GPU)."""

import pytest

SCRIPT_NAME = "bwd_variants_ab"  # the conftest's `script` fixture loads it


@pytest.fixture(scope="module")
def ab(script):
    return script


def test_points_and_variants_are_checked_before_any_gpu_work(ab, capsys):
    from mobalab.kernels._cuda_backward import BWD_VARIANTS, block_supported

    for argv, says in ((["--points", "3M"], "invalid choice"), (["--variants", "fast"], "'fast' is not one of"),
                       (["--variants", "block+UNROLL=2"], "is not MOBA_NAME=INTEGER")):
        with pytest.raises(SystemExit):
            ab.main(argv)
        assert says in capsys.readouterr().err
    # every point is a shape both variants run (the "block" variant: head dims 64, 128 at B 128)
    assert all(block_supported(dim, 128) for _, dim in ab.POINTS.values())
    assert set(BWD_VARIANTS) == {"auto", "tile", "block"}


def test_without_a_gpu_it_says_so(ab, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ab.main(["--points", "8K"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_variants_carry_build_options(ab, monkeypatch):
    """``block+MOBA_BWD_DQ_UNROLL=2``: the "block" variant with that define added to every backward launch (and only
    to those), the module's launch restored afterwards."""
    from mobalab.kernels import _cuda_backward as CB

    assert ab.parse_variant("tile") == ("tile", ())
    assert ab.parse_variant("block+MOBA_BWD_DQ_UNROLL=2+MOBA_X=-1") == ("block", ("MOBA_BWD_DQ_UNROLL=2", "MOBA_X=-1"))
    seen = []
    monkeypatch.setattr(CB, "launch", lambda plan: seen.append(plan))
    patched = CB.launch

    def fake_backward(*args, **kwargs):
        CB.launch(CB.Launch(CB.SOURCE, "moba_bwd_rows", (1,), (32,), (), 0, ("A=1",)))
        CB.launch(CB.Launch("pairs.cu", "moba_pairs_gather", (1,), (32,), ()))
        return kwargs["variant"]

    monkeypatch.setattr(ab, "moba_attention_backward_cuda", fake_backward)
    assert ab._backward_with(("MOBA_BWD_DQ_UNROLL=2",))(variant="block") == "block"
    assert [p.defines for p in seen] == [("A=1", "MOBA_BWD_DQ_UNROLL=2"), ()]
    assert ab._backward_with(()) is fake_backward and CB.launch is patched  # restored
