import contextlib

import pytest
import torch


@pytest.fixture
def poisoned_empty(monkeypatch):
    """``with poisoned_empty():`` makes torch.empty / empty_like return NaN (floats) or 2**30 (int32/64),
    so any output or scratch element a kernel fails to write shows up in the comparison."""
    real_empty, real_like = torch.empty, torch.empty_like

    def fill(t):
        if t.is_floating_point():
            return t.fill_(float("nan"))
        if t.dtype in (torch.int32, torch.int64):
            return t.fill_(2**30)
        return t

    @contextlib.contextmanager
    def ctx():
        with monkeypatch.context() as m:
            m.setattr(torch, "empty", lambda *a, **kw: fill(real_empty(*a, **kw)))
            m.setattr(torch, "empty_like", lambda *a, **kw: fill(real_like(*a, **kw)))
            yield

    return ctx
