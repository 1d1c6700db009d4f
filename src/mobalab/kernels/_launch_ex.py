"""Programmatic dependent launch: ``cuLaunchKernelEx`` with programmatic stream serialization, through ctypes.

CuPy launches a kernel with ``cuLaunchKernel``, which has no launch attributes. A kernel launched here with
``CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION`` may start while the previous kernel on the stream is
still running, as soon as every CTA of that kernel has run ``griddepcontrol.launch_dependents`` (or exited); its
CTAs then wait in ``griddepcontrol.wait`` until the previous grid has completed and its memory is visible. So the
dependent kernel's launch latency and CTA start-up overlap the previous kernel's last CTAs (Hopper and later;
captured into CUDA graphs as programmatic edges). Both instructions are in ``cuda/decode_common.cuh``
(``dec_grid_wait``, ``dec_grid_launch_dependents``); a kernel that uses them runs correctly with or without the
attribute.
"""

from __future__ import annotations

import ctypes
import functools

import numpy as np

__all__ = ["launch_dependent", "ATTR_PROGRAMMATIC_STREAM_SERIALIZATION"]

ATTR_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CUlaunchAttributeID, cuda.h


class _AttrValue(ctypes.Union):
    _fields_ = [("pad", ctypes.c_char * 64), ("programmatic", ctypes.c_int), ("align", ctypes.c_uint64)]


class _Attr(ctypes.Structure):  # CUlaunchAttribute: id, 4 bytes of padding, a 64-byte union
    _fields_ = [("id", ctypes.c_uint32), ("pad", ctypes.c_char * 4), ("value", _AttrValue)]


class _Config(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [("grid", ctypes.c_uint32 * 3), ("block", ctypes.c_uint32 * 3), ("shared_mem", ctypes.c_uint32),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_Attr)), ("num_attrs", ctypes.c_uint32)]


_SCALARS = {np.int32: ctypes.c_int32, np.uint32: ctypes.c_uint32, np.int64: ctypes.c_int64,
            np.uint64: ctypes.c_uint64, np.float32: ctypes.c_float, np.float64: ctypes.c_double,
            np.bool_: ctypes.c_bool}


@functools.cache
def _driver():
    lib = ctypes.CDLL("libcuda.so.1")
    fn = lib.cuLaunchKernelEx
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.POINTER(_Config), ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p]
    return fn


def _c_value(a):
    """A kernel argument as :func:`._launch.check_args` returns it -> its ctypes value (pointers are ints)."""
    if isinstance(a, int) and not isinstance(a, bool):
        return ctypes.c_uint64(a)
    kind = _SCALARS.get(type(a))
    if kind is None:
        raise TypeError(f"launch_dependent: no C type for an argument of type {type(a).__name__}")
    return kind(a.item())


def launch_dependent(function_ptr: int, grid, block, cargs, shared_mem: int, stream_ptr: int) -> None:
    """Launch the CUDA function ``function_ptr`` (a ``CUfunction``) with programmatic stream serialization on
    the stream ``stream_ptr``; ``cargs``: arguments as :func:`._launch.check_args` returns them."""
    values = [_c_value(a) for a in cargs]
    params = (ctypes.c_void_p * max(1, len(values)))(*[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p)
                                                        for v in values])
    attr = _Attr(id=ATTR_PROGRAMMATIC_STREAM_SERIALIZATION)
    attr.value.programmatic = 1
    grid = tuple(grid) + (1,) * (3 - len(grid))
    block = tuple(block) + (1,) * (3 - len(block))
    config = _Config((ctypes.c_uint32 * 3)(*grid), (ctypes.c_uint32 * 3)(*block), shared_mem,
                     ctypes.c_void_p(stream_ptr), ctypes.pointer(attr), 1)
    err = _driver()(ctypes.byref(config), ctypes.c_void_p(function_ptr), params, None)
    if err != 0:
        raise RuntimeError(f"cuLaunchKernelEx failed with CUresult {err}")
