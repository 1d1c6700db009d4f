"""MoBA attention: the readable torch reference and the CUDA kernels behind one API.

``moba_attention``, ``moba_topk`` and ``moba_centroids`` take (batch, seqlen, heads, head_dim) tensors.
CUDA tensors run the CuPy kernels (``mobalab[gpu]``); CPU tensors run :mod:`mobalab.kernels.reference`.
Nothing here imports CuPy until a CUDA tensor arrives.
"""

from __future__ import annotations

from . import reference
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
    "reference",
    "gpu_available",
]


def gpu_available() -> bool:
    """True when a CUDA device and CuPy are both usable (the kernels can run)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return False
        import cupy  # noqa: F401
    except Exception:
        return False
    return True


def moba_centroids(k, block_size: int):
    """Per-block mean of the keys, fp32: (batch, n_blocks, kv_heads, d). See the reference for the maths."""
    if k.is_cuda:
        from ._cuda_routing import moba_centroids_cuda

        return moba_centroids_cuda(k, block_size)
    return moba_centroids_reference(k, block_size)


def moba_topk(q, k, block_size: int, top_k: int, causal: bool = True):
    """Selected key blocks per query, int32 (batch, seqlen, heads, top_k); same contract as the reference."""
    if q.is_cuda:
        from ._cuda_routing import moba_topk_cuda

        return moba_topk_cuda(q, k, block_size, top_k, causal=causal)
    return moba_topk_reference(q, k, block_size, top_k, causal=causal)


def moba_attention(q, k, v, block_size: int, top_k: int, causal: bool = True, softmax_scale=None,
                   return_lse: bool = False, *, deterministic: bool = False):
    """MoBA attention, (batch, seqlen, heads, d) in and out; see :func:`reference.moba_attention`.

    CUDA tensors run the CUDA forward and, under autograd, the CUDA backward (custom op
    ``mobalab::moba_attention_fwd``, :mod:`mobalab.kernels.autograd`): gradients w.r.t. q, k, v, none
    through the routing. ``deterministic=False`` accumulates dQ with float atomics (last bits may differ
    run to run); ``deterministic=True`` gives bit-identical gradients at some extra time and scratch.
    CPU tensors run the torch reference (always deterministic; the flag is accepted and ignored).
    """
    if not isinstance(deterministic, bool):
        raise ValueError(f"moba_attention: deterministic must be True or False, got {deterministic!r}")
    if q.is_cuda:
        from .autograd import moba_attention_autograd

        return moba_attention_autograd(q, k, v, block_size, top_k, causal=causal, softmax_scale=softmax_scale,
                                       return_lse=return_lse, deterministic=deterministic)
    return moba_attention_reference(q, k, v, block_size, top_k, causal=causal, softmax_scale=softmax_scale,
                                    return_lse=return_lse)
