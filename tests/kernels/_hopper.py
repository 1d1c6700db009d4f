"""Why the tests of the sm_90a-only kernels (wgmma) cannot run here, if they cannot: they need a CUDA GPU, CuPy and
compute capability 9.0. A test module skips itself at import (so the skip is reported under its name):

    if reason := hopper_missing():  # pragma: no cover - depends on the machine
        pytest.skip(reason, allow_module_level=True)

Test modules are imported with ``--import-mode=importlib``: they put this folder on ``sys.path`` and import
``_hopper``.
"""

from __future__ import annotations

import torch


def hopper_missing() -> str | None:
    """The reason to skip (no CUDA GPU, CuPy does not import, not an sm_90 GPU), or None on a Hopper GPU."""
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    try:
        import cupy  # noqa: F401
    except ImportError as e:
        return f"could not import 'cupy': {e}"
    if torch.cuda.get_device_capability() != (9, 0):
        return "wgmma needs an sm_90 (Hopper) GPU"
    return None
