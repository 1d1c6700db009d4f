"""The module-level skip of the tests that run sm_90a-only kernels (wgmma): a CUDA GPU, CuPy and compute
capability 9.0, else the whole module is skipped before anything that needs them is imported or run.

Test modules are imported with ``--import-mode=importlib``: they put this folder on ``sys.path`` and import
``_hopper``.
"""

from __future__ import annotations

import pytest
import torch


def skip_unless_hopper() -> None:
    """Skip the calling test module unless a Hopper (sm_90) GPU and CuPy are there."""
    if not torch.cuda.is_available():  # pragma: no cover - depends on the machine
        pytest.skip("needs a CUDA GPU", allow_module_level=True)
    pytest.importorskip("cupy")
    if torch.cuda.get_device_capability() != (9, 0):  # pragma: no cover - wgmma is sm_90a only
        pytest.skip("wgmma needs an sm_90 (Hopper) GPU", allow_module_level=True)
