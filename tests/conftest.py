import importlib.util
import os
import shutil

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")


def _cuda_available() -> bool:
    if importlib.util.find_spec("cupy") is None:
        return False
    try:
        import torch

        if not torch.cuda.is_available():
            return False
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    has_gpu = _cuda_available()
    has_nvcc = shutil.which("nvcc") is not None
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU with CuPy (run `pytest -m gpu` on the device machine)")
    skip_nvcc = pytest.mark.skip(reason="needs nvcc on PATH")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)
        if "nvcc" in item.keywords and not has_nvcc:
            item.add_marker(skip_nvcc)
