"""The public dispatch (``mobalab.kernels.moba_attention`` / ``moba_topk`` / ``moba_centroids``): bad inputs are
turned away at the door with a message naming the argument, before any dispatch on ``.is_cuda``."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import mobalab.kernels as K


def _qkv(dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, 16, 2, 8, generator=g).to(dtype).to(device) for _ in range(3))


def test_public_names():
    assert K.__all__ == ["moba_attention", "moba_topk", "moba_centroids", "moba_attention_reference",
                         "moba_topk_reference", "moba_centroids_reference", "moba_attention_varlen",
                         "moba_topk_varlen", "MobaKVCache", "moba_decode", "moba_decode_reference", "decode_bytes",
                         "decode_flops", "expected_unique_blocks", "gpu_available"]
    assert all(callable(getattr(K, name)) for name in K.__all__)


@pytest.mark.parametrize("position", [0, 1, 2])
def test_numpy_arrays_raise_type_error_naming_the_argument(position):
    args = list(_qkv())
    args[position] = args[position].numpy()
    name = "qkv"[position]
    with pytest.raises(TypeError, match=rf"moba_attention: {name} must be a torch.Tensor, got numpy.ndarray"):
        K.moba_attention(*args, 4, 2)
    if position < 2:
        with pytest.raises(TypeError, match=rf"moba_topk: {name} must be a torch.Tensor, got numpy.ndarray"):
            K.moba_topk(*args[:2], 4, 2)


def test_other_non_tensors_raise_type_error():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match=r"moba_centroids: k must be a torch.Tensor, got numpy.ndarray"):
        K.moba_centroids(np.zeros((1, 16, 2, 8)), 4)
    with pytest.raises(TypeError, match=r"moba_attention: v must be a torch.Tensor, got list"):
        K.moba_attention(q, k, v.tolist(), 4, 2)
    with pytest.raises(TypeError, match=r"moba_topk: q must be a torch.Tensor, got NoneType"):
        K.moba_topk(None, k, 4, 2)


def test_meta_tensors_raise_value_error():
    q, k, v = _qkv(device="meta")
    with pytest.raises(ValueError, match=r"moba_attention: q is a meta tensor .*supported: CPU or CUDA tensors"):
        K.moba_attention(q, k, v, 4, 2)
    with pytest.raises(ValueError, match=r"moba_topk: q is a meta tensor"):
        K.moba_topk(q, k, 4, 2)
    with pytest.raises(ValueError, match=r"moba_centroids: k is a meta tensor"):
        K.moba_centroids(k, 4)


def test_mixed_devices_are_named_before_dispatch():
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v = _qkv()
    with FakeTensorMode():
        k_cuda = torch.empty(k.shape, device="cuda")
    with pytest.raises(ValueError, match=r"moba_attention: q, k, v must be on one device"):
        K.moba_attention(q, k_cuda, v, 4, 2)


def test_cpu_dispatch_runs_the_reference():
    q, k, v = _qkv(torch.float64)
    torch.testing.assert_close(K.moba_attention(q, k, v, 4, 2), K.moba_attention_reference(q, k, v, 4, 2),
                               rtol=0, atol=0)
    assert torch.equal(K.moba_topk(q, k, 4, 2), K.moba_topk_reference(q, k, 4, 2))
    assert torch.equal(K.moba_centroids(k, 4), K.moba_centroids_reference(k, 4))


def _public_docstrings() -> dict[str, str]:
    from mobalab.kernels import reference
    from mobalab.kernels.autograd import moba_attention_autograd

    funcs = {name: getattr(K, name) for name in K.__all__}
    funcs |= {f"reference.{name}": getattr(reference, name) for name in reference.__all__}
    funcs["moba_attention_autograd"] = moba_attention_autograd
    return {name: f.__doc__ or "" for name, f in funcs.items()}


def test_docstrings_list_the_head_dims_of_the_contract():
    # a list of head dims copied into a docstring goes stale when the kernels gain one
    from mobalab.kernels._contract import CUDA_HEAD_DIMS

    for name, doc in _public_docstrings().items():
        for listed in re.findall(r"head[ _]dims?\s+(\d+(?:\s*(?:/|,|and|or)\s*\d+)*)", doc):
            assert {int(x) for x in re.findall(r"\d+", listed)} == set(CUDA_HEAD_DIMS), (name, listed)


def test_docstrings_give_the_lse_dtype_of_float64_inputs():
    # every entry returns lse in float32, float64 for float64 inputs (the reference's compute dtype)
    for name, doc in _public_docstrings().items():
        for sentence in re.split(r"\.\s", " ".join(doc.split())):
            if "lse" in sentence and re.search(r"\b(fp32|float32)\b", sentence):
                assert "float64" in sentence or "fp64" in sentence, (name, sentence)
