"""Tensor maps (kernels/_tensor_map.py) and their launch arguments, without a GPU: what the copy engine requires is
checked with errors that name what was given, and a tensor-map parameter (``moba_tensor_map``, by value) is packed
as its 128 bytes between the other arguments of a real kernel's signature."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from mobalab.kernels import _cuda_decode_split as S
from mobalab.kernels import _launch
from mobalab.kernels._tensor_map import MAP_BYTES, TensorMap2D, tensor_map_2d


def test_geometry_of_a_cache_sized_tensor():
    k = torch.zeros(2, 3, 256, 128, dtype=torch.bfloat16)
    m = tensor_map_2d(k, 128, 64)
    assert (m.rows, m.cols, m.box_rows, m.box_cols) == (2 * 3 * 256, 128, 64, 64)
    raw = m.encoded()  # a CPU tensor: the host emulation's stand-in, the geometry
    assert len(raw) == MAP_BYTES and struct.unpack_from("<5q", raw) == (k.data_ptr(), 1536, 128, 64, 64)


@pytest.mark.parametrize(("tensor", "cols", "box_rows", "box_cols", "match"), [
    (torch.zeros(64, 128), 128, 64, 64, "2-byte elements"),
    (torch.zeros(64, 128, dtype=torch.float16).t(), 64, 64, 64, "contiguous"),
    (torch.zeros(10, 100, dtype=torch.float16), 128, 64, 64, "do not make rows"),
    (torch.zeros(64, 128, dtype=torch.float16), 128, 64, 32, "box_cols = 32"),
    (torch.zeros(64, 96, dtype=torch.float16), 96, 64, 64, "dividing the row"),
    (torch.zeros(64, 128, dtype=torch.float16), 128, 300, 64, "box_rows = 300"),
])
def test_unsupported_geometry_is_refused(tensor, cols, box_rows, box_cols, match):
    with pytest.raises(ValueError, match=match):
        tensor_map_2d(tensor, cols, box_rows, box_cols)


def test_attend_launch_packs_two_maps_after_the_scalars():
    plan = S.plan_split(1, 1, 8, 2, 128, 128, 4, 4096, 32, 4096)
    q = torch.zeros(1, 1, 8, 128, dtype=torch.bfloat16)
    k = torch.zeros(1, 2, 4096, 128, dtype=torch.bfloat16)
    bufs = {name: torch.zeros(1) for name in ("sel", "scores", "tops", "part_o", "part_ml", "out", "lse")}
    one = torch.zeros(1, dtype=torch.int32)
    plan_launch = S.attend_launch(plan, q, k, k.clone(), one, bufs, one, one, 0.1)
    cargs = _launch.check_args(plan_launch.source, plan_launch.kernel, plan_launch.args)
    assert [type(a) for a in cargs[-2:]] == [bytes, bytes] and all(len(a) == MAP_BYTES for a in cargs[-2:])
    assert struct.unpack_from("<5q", cargs[-2])[1:] == (2 * 4096, 128, plan.chunk, 64)
    packer, offsets = _launch._layout(plan_launch.source, plan_launch.kernel)
    assert offsets[-1] - offsets[-2] == MAP_BYTES and packer.size == offsets[-1] + MAP_BYTES
    block = bytearray(packer.size)
    packer.pack_into(block, 0, *cargs)
    assert bytes(block[offsets[-1]:]) == cargs[-1]
    # the second call takes the checked fast path and converts the maps again
    assert _launch.check_args(plan_launch.source, plan_launch.kernel, plan_launch.args)[-2:] == cargs[-2:]


def test_a_map_parameter_refuses_anything_else():
    plan = S.plan_split(1, 1, 8, 2, 128, 128, 4, 4096, 32, 4096)
    q = torch.zeros(1, 1, 8, 128, dtype=torch.bfloat16)
    bufs = {name: torch.zeros(1) for name in ("sel", "scores", "tops", "part_o", "part_ml", "out", "lse")}
    one = torch.zeros(1, dtype=torch.int32)
    good = S.attend_launch(plan, q, q, q, one, bufs, one, one, 0.1)
    args = (*good.args[:-1], np.int32(0))
    with pytest.raises(TypeError, match="vmap is C 'moba_tensor_map' and needs TensorMap2D"):
        _launch.check_args(good.source, good.kernel, args)
    assert isinstance(good.args[-1], TensorMap2D)


def test_refusals_name_the_layout_and_address_given():
    with pytest.raises(ValueError, match=r"shape \(128, 64\) and strides \(1, 128\); supported: contiguous"):
        tensor_map_2d(torch.zeros(64, 128, dtype=torch.float16).t(), 64, 64)
    shifted = torch.zeros(8 * 128 + 1, dtype=torch.bfloat16)[1:]  # 2 bytes past a 16-byte boundary
    with pytest.raises(ValueError, match=rf"address {shifted.data_ptr():#x} and rows of 256 bytes; supported: both "
                                         "multiples of 16 bytes"):
        tensor_map_2d(shifted, 128, 64)
