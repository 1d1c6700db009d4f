"""The device every CUDA launch of a rank goes to: torch's and CuPy's current device, both the tensor's.

torch launches on the device of its current context (``torch.cuda.device``); the CUDA kernels are CuPy
modules, which are loaded into, and launch on, CuPy's current device. Both are per-thread settings, and a
rank process on GPU r whose CuPy still points at GPU 0 would load its modules there and launch onto another
GPU's stream. So every kernel call of context parallelism runs inside :func:`on_device` of its inputs.
"""

from __future__ import annotations

import contextlib

__all__ = ["on_device", "use_device"]


@contextlib.contextmanager
def on_device(x):
    """Inside: torch's and CuPy's current device are ``x``'s (nothing changes for CPU tensors)."""
    if not x.is_cuda:
        yield
        return
    import torch

    from ..kernels._build import cupy

    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    with torch.cuda.device(index), cupy().cuda.Device(index):
        yield


def use_device(index: int) -> None:
    """Make GPU ``index`` current for torch and, when it is installed, CuPy (a rank's setup, before any launch)."""
    import torch

    torch.cuda.set_device(index)
    try:
        import cupy
    except ImportError:  # the reference path needs no CuPy
        return
    cupy.cuda.Device(index).use()
