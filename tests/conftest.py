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


# Under pytest-xdist (the README's command: a file per worker, in collection order) the files that take longest on a
# 2-core CI machine go first, so that the workers end together rather than one running, say, the notebooks alone.
_SLOW_FIRST = (
    "tests/kernels/test_attention_emulation.py", "tests/kernels/test_compile.py",
    "tests/kernels/test_decode_split_emulation.py", "tests/kernels/test_decode_split_compile.py",
    "tests/test_notebooks.py", "tests/test_cli.py", "tests/kernels/test_attention_bwd_wgmma_emulation.py",
    "tests/kernels/test_reference.py", "tests/distributed/test_context_parallel.py",
    "tests/kernels/test_decode_emulation.py", "tests/experiments/test_trained_routing.py",
    "tests/kernels/test_routing_mma_emulation.py", "tests/kernels/test_decode_compile.py",
    "tests/kernels/test_compile_portable.py",
)


def pytest_collection_modifyitems(config, items):
    if os.environ.get("PYTEST_XDIST_WORKER") is not None:
        rank = {name: i for i, name in enumerate(_SLOW_FIRST)}
        root = config.rootpath
        items.sort(key=lambda item: rank.get(item.path.relative_to(root).as_posix(), len(rank)))  # stable
    has_gpu = _cuda_available()
    has_nvcc = shutil.which("nvcc") is not None
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU with CuPy (run `pytest -m gpu` on the device machine)")
    skip_nvcc = pytest.mark.skip(reason="needs nvcc on PATH")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)
        if "nvcc" in item.keywords and not has_nvcc:
            item.add_marker(skip_nvcc)
