"""scripts/bwd_step_ab.py on the CPU: its choices and refusals, and the switches it flips (the timing needs a
GPU)."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bwd_step_ab.py"


@pytest.fixture(scope="module")
def ab():
    spec = importlib.util.spec_from_file_location("bwd_step_ab", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_arguments_are_checked_before_any_gpu_work(ab, capsys):
    for argv in (["--compare", "fast"], ["--compare", "lists", "--points", "3M"], []):
        with pytest.raises(SystemExit):
            ab.main(argv)
        capsys.readouterr()
    with pytest.raises(SystemExit):
        ab.main(["--compare", "order", "--rounds", "2"])
    assert "at least 3" in capsys.readouterr().err


def test_without_a_gpu_it_says_so(ab, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ab.main(["--compare", "lists", "--points", "8K"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_the_switches_turn_the_settings_off_and_back_on(ab):
    import mobalab.kernels._cuda_backward as G
    import mobalab.kernels.autograd as AG

    kept, ordered = AG._lists_numel, G.orders_longest_first
    try:
        lists, order = ab._switch("lists"), ab._switch("order")
        lists(False)
        order(False)
        assert AG._lists_numel(None, None, 128, 8, False) == 0
        assert not G.orders_longest_first("block", 100, 132)
        lists(True)
        order(True)
        assert AG._lists_numel is kept and G.orders_longest_first is ordered
    finally:
        AG._lists_numel, G.orders_longest_first = kept, ordered
