"""The programmatic dependent launch's ctypes structures match cuda.h, and its arguments are packed with the
kernels' C types (the launch itself needs a GPU: the decode GPU tests run every split step through it)."""

from __future__ import annotations

import ctypes
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from mobalab.kernels import _launch_ex as X


def test_structures_have_the_driver_layout():
    # CUlaunchAttribute: a 4-byte id, 4 bytes of padding, a 64-byte union with 8-byte members
    assert ctypes.sizeof(X._Attr) == 72 and X._Attr.value.offset == 8
    # CUlaunchConfig: six dims, the shared memory, then the stream and attribute pointers, the count
    assert [getattr(X._Config, f).offset for f in ("grid", "block", "shared_mem", "stream", "attrs", "num_attrs")] \
        == [0, 12, 24, 32, 40, 48]
    assert ctypes.sizeof(X._Config) == 56


def _cuda_h() -> Path | None:
    roots = [Path(os.environ[v]) for v in ("CUDA_HOME", "CUDA_PATH") if v in os.environ]
    if shutil.which("nvcc"):
        roots.append(Path(shutil.which("nvcc")).resolve().parents[1])
    roots += sorted(Path("/usr/local").glob("cuda*"), reverse=True)
    return next((r / "include" / "cuda.h" for r in roots if (r / "include" / "cuda.h").exists()), None)


@pytest.mark.skipif(_cuda_h() is None, reason="needs the CUDA toolkit's cuda.h")
def test_attribute_id_is_cuda_h_s():
    header = _cuda_h()
    m = re.search(r"CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION\s*=\s*(\d+)", header.read_text())
    assert m and int(m.group(1)) == X.ATTR_PROGRAMMATIC_STREAM_SERIALIZATION


def test_arguments_become_their_c_types():
    assert isinstance(X._c_value(0x7F0012340000), ctypes.c_uint64)  # a device pointer
    assert X._c_value(np.int32(-3)).value == -3 and isinstance(X._c_value(np.int32(1)), ctypes.c_int32)
    assert X._c_value(np.float32(0.5)).value == 0.5 and isinstance(X._c_value(np.float32(1)), ctypes.c_float)
    with pytest.raises(TypeError, match="no C type"):
        X._c_value(1.5)  # a Python float would be a double: check_args never lets one through
