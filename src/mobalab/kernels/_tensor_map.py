"""Tensor maps for sm_90's copy engine (``cp.async.bulk.tensor``): a 16-bit tensor viewed as a 2-D array of
``rows`` x ``cols`` elements and a box of ``box_rows`` x ``box_cols``, encoded by the driver
(``cuTensorMapEncodeTiled``) into the 128-byte object a kernel takes by value as a ``__grid_constant__``
parameter (C type ``moba_tensor_map``, cuda/decode_common.cuh).

The box's rows are 128 bytes (``box_cols`` 64 elements) and land in shared memory with the 128-byte swizzle:
16-byte chunk ``c`` of box row ``r`` at chunk ``c ^ (r & 7)`` of that row, which is what the kernels' ldmatrix
addressing expects. Rows outside the tensor are filled with zeros by the copy engine. The encoding is a pure host
call, made once per (tensor address, geometry) and kept by the caller; on a CPU tensor (the host emulation of the
kernels, tests) :meth:`TensorMap2D.encoded` returns a stand-in that no GPU ever reads.
"""

from __future__ import annotations

import ctypes
import functools
import struct
from dataclasses import dataclass

import torch

from ._build import device_capability

__all__ = ["TensorMap2D", "tensor_map_2d", "MAP_BYTES"]

MAP_BYTES = 128
_DTYPE_UINT16 = 1  # CU_TENSOR_MAP_DATA_TYPE_UINT16: the copy moves bits, bf16 and fp16 alike
_INTERLEAVE_NONE = 0
_SWIZZLE_128B = 3
_L2_PROMOTION_128B = 2
_OOB_FILL_ZEROS = 0  # CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE: zeros outside the tensor
_MAX_DIM = 2**32
_MAX_COORD = 2**31 - 1  # a copy's row coordinate is a signed 32-bit integer


@dataclass(eq=False)
class TensorMap2D:
    """``tensor`` (contiguous, 2-byte elements) as ``rows`` x ``cols``, boxes of ``box_rows`` x ``box_cols``."""

    tensor: torch.Tensor
    rows: int
    cols: int
    box_rows: int
    box_cols: int
    _bytes: bytes | None = None

    def encoded(self) -> bytes:
        """The 128-byte tensor map (driver-encoded on a CUDA tensor, made once), as the kernel parameter."""
        if self._bytes is None:
            if self.tensor.device.type == "cuda" and device_capability(self.tensor.device)[0] >= 9:
                self._bytes = _encode(self.tensor.data_ptr(), self.rows, self.cols, self.box_rows, self.box_cols)
            elif self.tensor.device.type == "cuda":  # tensor maps are sm_90's: the kernels built there read none
                self._bytes = bytes(MAP_BYTES)
            else:  # host emulation: the harness rebuilds the map from the geometry
                self._bytes = struct.pack("<5q", self.tensor.data_ptr(), self.rows, self.cols, self.box_rows,
                                          self.box_cols).ljust(MAP_BYTES, b"\0")
        return self._bytes


def tensor_map_2d(tensor: torch.Tensor, cols: int, box_rows: int, box_cols: int = 64) -> TensorMap2D:
    """A :class:`TensorMap2D` of contiguous ``tensor`` viewed as (numel / cols, cols); checks what the copy engine
    requires (2-byte elements, 16-byte aligned address and rows, 128-byte box rows, at most 256 box rows, fewer
    than 2^31 rows) and raises ValueError naming what was given."""
    if tensor.element_size() != 2:
        raise ValueError(f"tensor_map_2d: elements of {tensor.element_size()} bytes ({tensor.dtype}); "
                         "supported: 2-byte elements (bf16, fp16)")
    if not tensor.is_contiguous():
        raise ValueError(f"tensor_map_2d: a tensor of shape {tuple(tensor.shape)} and strides {tensor.stride()}; "
                         "supported: contiguous tensors")
    if cols <= 0 or tensor.numel() % cols:
        raise ValueError(f"tensor_map_2d: {tensor.numel()} elements do not make rows of {cols}")
    rows = tensor.numel() // cols
    if box_cols * 2 != 128 or cols % box_cols:
        raise ValueError(f"tensor_map_2d: box_cols = {box_cols} of rows of {cols}; supported: 64 (128-byte box "
                         "rows, the 128-byte swizzle) dividing the row")
    if not 1 <= box_rows <= 256:
        raise ValueError(f"tensor_map_2d: box_rows = {box_rows}; supported: 1 .. 256")
    if rows > _MAX_COORD or rows >= _MAX_DIM:
        raise ValueError(f"tensor_map_2d: {rows} rows; supported: fewer than 2^31")
    if tensor.data_ptr() % 16 or (cols * 2) % 16:
        raise ValueError(f"tensor_map_2d: address {tensor.data_ptr():#x} and rows of {cols * 2} bytes; supported: "
                         "both multiples of 16 bytes")
    return TensorMap2D(tensor, rows, cols, box_rows, box_cols)


@functools.cache
def _encoder():
    lib = ctypes.CDLL("libcuda.so.1")
    fn = lib.cuTensorMapEncodeTiled
    u64p, u32p = ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_uint32)
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p, u64p, u64p, u32p, u32p,
                   ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def _encode(address: int, rows: int, cols: int, box_rows: int, box_cols: int) -> bytes:
    """cuTensorMapEncodeTiled of a row-major (rows, cols) uint16 tensor at ``address``, 128-byte swizzle."""
    buf = ctypes.create_string_buffer(MAP_BYTES + 128)
    at = (ctypes.addressof(buf) + 127) & ~127  # CUtensorMap is 128-byte aligned (cuda.h)
    dims = (ctypes.c_uint64 * 2)(cols, rows)
    strides = (ctypes.c_uint64 * 1)(cols * 2)  # bytes between rows (the innermost dimension's stride is implied)
    box = (ctypes.c_uint32 * 2)(box_cols, box_rows)
    steps = (ctypes.c_uint32 * 2)(1, 1)
    status = _encoder()(at, _DTYPE_UINT16, 2, address, dims, strides, box, steps, _INTERLEAVE_NONE, _SWIZZLE_128B,
                        _L2_PROMOTION_128B, _OOB_FILL_ZEROS)
    if status != 0:
        raise RuntimeError(f"cuTensorMapEncodeTiled failed (CUresult {status}) for a ({rows}, {cols}) tensor with "
                           f"boxes of ({box_rows}, {box_cols})")
    return ctypes.string_at(at, MAP_BYTES)
