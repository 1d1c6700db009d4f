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
