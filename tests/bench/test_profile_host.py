"""scripts/profile_host.py on the CPU: the GPU-gap finder on a synthetic timeline, and the refusal without a GPU."""

from types import SimpleNamespace

import pytest
import torch

SCRIPT_NAME = "profile_host"  # the conftest's `script` fixture loads it


@pytest.fixture(scope="module")
def ph(script):
    return script


def _event(name, start, end, device=torch.autograd.DeviceType.CUDA):
    span = SimpleNamespace(start=start, end=end, elapsed_us=lambda: end - start)
    return SimpleNamespace(name=name, time_range=span, device_type=device)


def test_gaps_are_the_idle_stretches_between_device_events(ph):
    events = [_event("c", 30.0, 50.0), _event("a", 0.0, 10.0), _event("b", 12.0, 20.0),  # 2 us: no gap
              _event("host", 20.0, 40.0, torch.autograd.DeviceType.CPU),  # host events do not fill a gap
              _event("d", 40.0, 45.0),  # inside c: no gap
              _event("e", 70.0, 71.0)]
    gaps, span = ph._gaps(SimpleNamespace(events=lambda: events))
    assert gaps == [(10.0, "b", "c"), (20.0, "c", "e")]
    assert span == 71.0


def test_without_a_gpu_it_says_so(ph, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ph.main(["--steps", "2"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_waits_table_gives_each_launch_the_growth_of_the_lag(ph):
    rows = [("centroids", 0.2, 0.25, 0.05), ("topk", 0.3, 0.40, 0.15), ("tile", 0.5, 1.40, 1.10)]
    table = ph._waits_table(8192, rows, 1.5, 1.2).splitlines()
    assert "GPU waits 0.300 ms" in table[0]
    waits = [float(line.split()[-1]) for line in table[2:]]
    assert waits == pytest.approx([0.2, 0.05, 0.05, 0.0])  # lags 0.20, 0.25, 0.30; the end adds nothing


def test_call_times_wraps_and_restores_the_traced_functions(ph, monkeypatch):
    from mobalab.kernels import _contract

    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    real = _contract.check_tensor
    x = torch.ones(2)
    calls = ph._call_times(lambda: [_contract.check_tensor("f", "x", x), torch.empty(1)], reps=3)
    assert [(d, name) for d, name, _, _ in calls] == [(0, "check_tensor"), (0, "empty")]
    assert all(0 <= t_in <= t_out for _, _, t_in, t_out in calls)
    assert _contract.check_tensor is real and "traced" not in torch.empty.__name__
    assert "check_tensor" in ph._calls_table(2, calls)
