"""scripts/bwd_variants_ab.py on the CPU: its points, variants and refusals (the timing needs a GPU)."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bwd_variants_ab.py"


@pytest.fixture(scope="module")
def ab():
    spec = importlib.util.spec_from_file_location("bwd_variants_ab", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_points_and_variants_are_checked_before_any_gpu_work(ab, capsys):
    from mobalab.kernels._cuda_backward import BWD_VARIANTS, block_supported

    for argv in (["--points", "3M"], ["--variants", "fast"]):
        with pytest.raises(SystemExit):
            ab.main(argv)
        assert "invalid choice" in capsys.readouterr().err
    # every point is a shape both variants run (the "block" variant: head dims 64, 128 at B 128)
    assert all(block_supported(dim, 128) for _, dim in ab.POINTS.values())
    assert set(BWD_VARIANTS) == {"auto", "tile", "block"}


def test_without_a_gpu_it_says_so(ab, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ab.main(["--points", "8K"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
