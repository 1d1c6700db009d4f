"""MoBA attention: the readable torch reference and the CUDA kernels behind one API.

``moba_attention``, ``moba_topk`` and ``moba_centroids`` take (batch, seqlen, heads, head_dim) tensors.
CUDA tensors run the CuPy kernels (``mobalab[gpu]``); CPU tensors run :mod:`mobalab.kernels.reference`.
Nothing here imports CuPy until a CUDA tensor arrives. Modules:

* :mod:`~mobalab.kernels.reference`: the maths (routing, attention, its backward, dense attention);
* :mod:`~mobalab.kernels.autograd`: the custom ops and :func:`~mobalab.kernels.autograd.moba_attention_autograd`;
* private: ``_contract`` (the input contract every entry point validates with), ``_cuda_routing``,
  ``_cuda_attention``, ``_cuda_backward`` (the CUDA wrappers), ``_launch`` and ``_build`` (compiling and
  launching the ``cuda/*.cu`` kernels).
"""

from __future__ import annotations

import torch

from . import _contract as _C
from . import reference  # noqa: F401  (mobalab.kernels.reference, the ground truth, is a public module)
from ._decode import moba_decode, moba_decode_reference
from ._decode_cost import decode_bytes, decode_flops, expected_unique_blocks
from ._kv_cache import MobaKVCache
from ._varlen import moba_attention_varlen, moba_topk_varlen
from .reference import moba_attention as moba_attention_reference
from .reference import moba_centroids as moba_centroids_reference
from .reference import moba_topk as moba_topk_reference

__all__ = [
    "moba_attention",
    "moba_topk",
    "moba_centroids",
    "moba_attention_reference",
    "moba_topk_reference",
    "moba_centroids_reference",
    "moba_attention_varlen",
    "moba_topk_varlen",
    "MobaKVCache",
    "moba_decode",
    "moba_decode_reference",
    "decode_bytes",
    "decode_flops",
    "expected_unique_blocks",
    "gpu_available",
]


def gpu_available() -> bool:
    """True when a CUDA device and CuPy are both usable (the kernels can run).

    Examples
    --------
    >>> isinstance(gpu_available(), bool)
    True
    """
    try:
        import torch

        if not torch.cuda.is_available():
            return False
        import cupy  # noqa: F401
    except Exception:
        return False
    return True


def _at_the_door(fn: str, named) -> bool:
    """Check what dispatch needs (tensors with data, on one device); True for CUDA tensors."""
    for name, x in named:
        _C.check_tensor(fn, name, x)
    _C.check_same_device(fn, named)
    return named[0][1].is_cuda


def moba_centroids(k, block_size: int):
    """Per-block mean of the keys, float32 (float64 for float64 keys): (batch, n_blocks, kv_heads, d); see
    :func:`reference.moba_centroids`.

    Examples
    --------
    >>> import torch
    >>> moba_centroids(torch.ones(1, 10, 2, 4), 4).shape
    torch.Size([1, 3, 2, 4])
    """
    if _at_the_door("moba_centroids", [("k", k)]):
        from ._cuda_routing import moba_centroids_cuda

        return moba_centroids_cuda(k, block_size)
    return moba_centroids_reference(k, block_size)


def moba_topk(q, k, block_size: int, top_k: int, causal: bool = True, *, centroid_precision: str = "fp32"):
    """Selected key blocks per query, int32 (batch, seqlen, heads, top_k); see :func:`reference.moba_topk`.

    ``centroid_precision``: "fp32" (the default) scores each block's fp32 mean key; "input" scores that mean
    rounded to the keys' dtype, as MoBA and FlashMoBA store their centroids (on a GPU one tensor-core product per
    score instead of two).

    Examples
    --------
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> q, k = torch.randn(1, 8, 1, 4, generator=g), torch.randn(1, 8, 1, 4, generator=g)
    >>> moba_topk(q, k, 2, 2)[0, -1, 0].tolist()  # own block 3, then the best past block
    [3, 1]
    """
    if torch.compiler.is_compiling():  # one opaque op (the routing cannot be traced), run eagerly
        from .autograd import moba_topk_op

        return moba_topk_op(q, k, block_size, top_k, causal, centroid_precision)
    if _at_the_door("moba_topk", [("q", q), ("k", k)]):
        from ._cuda_routing import moba_topk_cuda

        return moba_topk_cuda(q, k, block_size, top_k, causal=causal, centroid_precision=centroid_precision)
    return moba_topk_reference(q, k, block_size, top_k, causal=causal, centroid_precision=centroid_precision)


def moba_attention(q, k, v, block_size: int, top_k: int, causal: bool = True, softmax_scale=None,
                   return_lse: bool = False, *, deterministic: bool = False, centroid_precision: str = "fp32"):
    """MoBA attention, (batch, seqlen, heads, d) in and out; see :func:`reference.moba_attention`.

    CUDA tensors run the CUDA forward and, under autograd, the CUDA backward (custom op
    ``mobalab::moba_attention_fwd``, :mod:`mobalab.kernels.autograd`): gradients w.r.t. q, k, v, none
    through the routing. ``deterministic=False`` accumulates dQ with float atomics (last bits may differ
    run to run); ``deterministic=True`` gives bit-identical gradients at some extra time and scratch.
    CPU tensors run the torch reference (always deterministic; the flag is checked and ignored), under
    ``torch.compile`` as the same custom op.
    ``centroid_precision``: the routing's centroids, as :func:`moba_topk`.

    Examples
    --------
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> q, k, v = (torch.randn(1, 8, 2, 4, generator=g) for _ in range(3))
    >>> moba_attention(q, k, v, block_size=2, top_k=2).shape
    torch.Size([1, 8, 2, 4])
    """
    fn = "moba_attention"
    _C.check_flag(fn, "deterministic", deterministic)
    if _at_the_door(fn, [("q", q), ("k", k), ("v", v)]):
        from .autograd import moba_attention_autograd

        return moba_attention_autograd(q, k, v, block_size, top_k, causal=causal, softmax_scale=softmax_scale,
                                       return_lse=return_lse, deterministic=deterministic,
                                       centroid_precision=centroid_precision)
    return moba_attention_reference(q, k, v, block_size, top_k, causal=causal, softmax_scale=softmax_scale,
                                    return_lse=return_lse, centroid_precision=centroid_precision)
