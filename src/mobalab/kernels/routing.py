r"""MoBA routing on the GPU: block centroids and the fused per-query top-k (cuda/centroids.cu, cuda/topk.cu).

Same contract as :mod:`mobalab.kernels.reference` (``moba_centroids`` / ``moba_topk``):

.. math::
    \bar k_j = \frac{1}{|j|}\sum_{i \in j} k_i \ (\text{fp32}), \qquad s_{t,j} = \langle q_t, \bar k_j\rangle,

causal: slot 0 = own block :math:`\lfloor t/B \rfloor`, then the best :math:`k-1` complete past blocks;
non-causal: the best :math:`k` of all :math:`n = \lceil N/B \rceil` blocks; ranked by (score, block index)
descending, ``-1`` in unused slots.

The score is computed on tensor cores as :math:`q\cdot c_{hi} + q\cdot c_{lo}` with the fp32 centroid split
into two values of the input dtype (:math:`c_{hi} = T(c)`, :math:`c_{lo} = T(c - c_{hi})`), which is the fp32
score to about :math:`2^{-16}` relative error: indices can differ from the reference only at near-ties.

Everything that decides what a kernel receives (validation, shapes, grid, argument tuples) is plain Python
(:func:`check_topk_inputs`, :func:`check_centroid_inputs`, :func:`centroid_launch`, :func:`split_launch`,
:func:`topk_launch`), so CI checks it against the CUDA signatures without a GPU. Memory comes from torch's
caching allocator; kernels run on torch's current stream; nothing here synchronises with the host.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "moba_centroids_cuda",
    "moba_topk_cuda",
    "check_centroid_inputs",
    "check_topk_inputs",
    "centroid_launch",
    "split_launch",
    "topk_launch",
    "topk_shared_bytes",
    "topk_list_tier",
    "Launch",
    "SUPPORTED_DTYPES",
    "SUPPORTED_HEAD_DIMS",
    "SUPPORTED_BLOCK_SIZES",
    "MAX_TOP_K",
]

SUPPORTED_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16"}
SUPPORTED_HEAD_DIMS = (64, 128)
SUPPORTED_BLOCK_SIZES = (16, 32, 64, 128, 256, 512)
MAX_TOP_K = 64

# Must match the #defines in cuda/centroids.cu and cuda/topk.cu.
CENTROID_THREADS = 128
TOPK_BM = 128  # query rows per CTA
TOPK_BN = 64  # centroids per streamed tile
TOPK_THREADS = 128

_MAX_GRID_YZ = 65535
_INT32_MAX = 2**31 - 1


# ---------------------------------------------------------------------------------------------------
# validation (pure: shapes, dtypes and devices only)


def _dtype_names() -> str:
    return ", ".join(str(d).replace("torch.", "") for d in SUPPORTED_DTYPES)


def _check_block_size(block_size, fn: str) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral) or (
            int(block_size) not in SUPPORTED_BLOCK_SIZES):
        raise ValueError(
            f"{fn}: block_size={block_size!r} is not supported; supported: {SUPPORTED_BLOCK_SIZES}"
        )
    return int(block_size)


def _check_4d(name: str, shape, dtype, fn: str) -> tuple[int, int, int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 4:
        raise ValueError(f"{fn}: {name} must be 4-D (batch, seqlen, heads, head_dim), got shape {shape}")
    if any(s < 1 for s in shape):
        raise ValueError(f"{fn}: {name} has an empty dimension, shape {shape}; every dimension must be >= 1")
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{fn}: {name} has dtype {dtype}; supported on the GPU: {_dtype_names()}")
    batch, seqlen, heads, dim = shape
    if dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"{fn}: {name} has head_dim {dim}; supported: {SUPPORTED_HEAD_DIMS}")
    if seqlen > _INT32_MAX:
        raise ValueError(f"{fn}: {name} has seqlen {seqlen}; supported: up to {_INT32_MAX}")
    if batch > _MAX_GRID_YZ or heads > _MAX_GRID_YZ:
        raise ValueError(f"{fn}: {name} has batch {batch} and heads {heads}; each must be <= {_MAX_GRID_YZ}")
    return shape


def _check_cuda_device(name: str, device, fn: str) -> None:
    if torch.device(device).type != "cuda":
        raise ValueError(f"{fn}: {name} is on {device}; the GPU kernels need CUDA tensors")


def check_centroid_inputs(k_shape, k_dtype, k_device, block_size) -> int:
    """Validate ``moba_centroids_cuda`` inputs; returns the block size as int. Raises ValueError."""
    fn = "moba_centroids_cuda"
    _check_4d("k", k_shape, k_dtype, fn)
    _check_cuda_device("k", k_device, fn)
    return _check_block_size(block_size, fn)


def check_topk_inputs(q_shape, q_dtype, q_device, k_shape, k_dtype, k_device, block_size, top_k, causal,
                      centroids=None) -> tuple[int, int]:
    """Validate ``moba_topk_cuda`` inputs; returns (block_size, top_k). Raises ValueError.

    ``centroids`` is None or a ``(shape, dtype, device)`` triple of the given centroids.
    """
    fn = "moba_topk_cuda"
    bq, nq, hq, dq = _check_4d("q", q_shape, q_dtype, fn)
    bk, nk, hk, dk = _check_4d("k", k_shape, k_dtype, fn)
    _check_cuda_device("q", q_device, fn)
    _check_cuda_device("k", k_device, fn)
    if torch.device(q_device) != torch.device(k_device):
        raise ValueError(f"{fn}: q is on {q_device} and k on {k_device}; they must be on one CUDA device")
    if q_dtype != k_dtype:
        raise ValueError(f"{fn}: q has dtype {q_dtype} and k {k_dtype}; they must match")
    if (bq, nq, dq) != (bk, nk, dk):
        raise ValueError(
            f"{fn}: q {tuple(q_shape)} and k {tuple(k_shape)} must agree in batch, seqlen (self-attention) "
            "and head_dim"
        )
    if hq % hk != 0:
        raise ValueError(f"{fn}: q heads ({hq}) must be a multiple of kv heads ({hk}) (MHA, GQA or MQA)")
    block_size = _check_block_size(block_size, fn)
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or not 1 <= int(top_k) <= MAX_TOP_K:
        raise ValueError(f"{fn}: top_k={top_k!r} is not supported; supported: integers 1..{MAX_TOP_K}")
    if not isinstance(causal, bool):
        raise ValueError(f"{fn}: causal must be True or False, got {causal!r}")
    if centroids is not None:
        c_shape, c_dtype, c_device = centroids
        want = (bk, math.ceil(nk / block_size), hk, dk)
        if tuple(int(s) for s in c_shape) != want:
            raise ValueError(f"{fn}: centroids have shape {tuple(c_shape)}; expected {want} "
                             "(batch, n_blocks, kv_heads, head_dim)")
        if c_dtype != torch.float32:
            raise ValueError(f"{fn}: centroids have dtype {c_dtype}; expected torch.float32")
        if torch.device(c_device) != torch.device(q_device):
            raise ValueError(f"{fn}: centroids are on {c_device} and q on {q_device}; they must match")
    return block_size, int(top_k)


# ---------------------------------------------------------------------------------------------------
# launch plans (pure: argument tuples with the exact C scalar types)


@dataclass(frozen=True)
class Launch:
    """One kernel launch: which kernel, its grid/block, its arguments and its dynamic shared memory."""

    filename: str
    kernel: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    args: tuple
    shared_mem: int = 0
    max_shared_mem: int = 0  # the kernel's dynamic shared-memory limit to set (largest it ever gets)


def _ptr(t):
    """A tensor passes as itself (check_args takes its data_ptr); a missing optional buffer as NULL."""
    return 0 if t is None else t


def centroid_launch(k: torch.Tensor, cent: torch.Tensor, hi: torch.Tensor | None, lo: torch.Tensor | None,
                    block_size: int) -> Launch:
    """Centroid kernel over k (b, N, g, d) into cent (b, n, g, d) fp32 and, when given, hi/lo (b, g, n, d)."""
    batch, seqlen, kv_heads, dim = k.shape
    n_blocks = math.ceil(seqlen / block_size)
    name = f"moba_centroids_{SUPPORTED_DTYPES[k.dtype]}_d{dim}"
    args = (k, cent, _ptr(hi), _ptr(lo), np.int32(seqlen), np.int32(n_blocks), np.int32(kv_heads),
            np.int32(block_size))
    return Launch("centroids.cu", name, (n_blocks, kv_heads, batch), (CENTROID_THREADS, 1, 1), args)


def split_launch(cent: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor) -> Launch:
    """Split given fp32 centroids (b, n, g, d) into hi/lo (b, g, n, d) of hi's dtype."""
    batch, n_blocks, kv_heads, dim = cent.shape
    name = f"moba_split_centroids_{SUPPORTED_DTYPES[hi.dtype]}"
    args = (cent, hi, lo, np.int32(n_blocks), np.int32(kv_heads), np.int32(dim))
    return Launch("centroids.cu", name, (n_blocks, kv_heads, batch), (dim, 1, 1), args)


def topk_list_tier(top_k: int, causal: bool) -> int:
    """Kernel tier by list length (top_k - 1 causal, top_k otherwise): 8 and 16 keep the per-row lists in
    registers, 64 in a shared-memory heap."""
    list_cap = top_k - 1 if causal else top_k
    return 8 if list_cap <= 8 else 16 if list_cap <= 16 else 64


def topk_shared_bytes(dim: int, top_k: int, causal: bool, itemsize: int = 2) -> int:
    """Dynamic shared memory of one top-k CTA: Q tile, hi/lo centroid tiles, score tile, tier-64 heaps."""
    list_cap = top_k - 1 if causal else top_k
    lists = list_cap * TOPK_BM * 8 if topk_list_tier(top_k, causal) == 64 else 0
    return (TOPK_BM * dim + 2 * TOPK_BN * dim) * itemsize + TOPK_BM * TOPK_BN * 4 + lists


def topk_launch(q: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor, out: torch.Tensor, block_size: int,
                top_k: int, causal: bool) -> Launch:
    """Fused top-k kernel: q (b, N, h, d), hi/lo (b, g, n, d) -> out int32 (b, N, h, top_k)."""
    batch, seqlen, heads, dim = q.shape
    kv_heads, n_blocks = hi.shape[1], hi.shape[2]
    tier = topk_list_tier(top_k, causal)
    name = f"moba_topk_{SUPPORTED_DTYPES[q.dtype]}_d{dim}_{'causal' if causal else 'full'}_k{tier}"
    args = (q, hi, lo, out, np.int32(seqlen), np.int32(heads), np.int32(kv_heads), np.int32(block_size),
            np.int32(n_blocks), np.int32(top_k))
    grid = (math.ceil(seqlen / TOPK_BM), heads, batch)
    return Launch("topk.cu", name, grid, (TOPK_THREADS, 1, 1), args,
                  shared_mem=topk_shared_bytes(dim, top_k, causal),
                  max_shared_mem=topk_shared_bytes(dim, MAX_TOP_K, False))


# ---------------------------------------------------------------------------------------------------
# running


def _run(plan: Launch) -> None:
    """Check the arguments against the .cu signature and launch on torch's current stream.

    The dynamic shared-memory limit is a property of the CUfunction shared by every RawKernel object of
    the module, so it is set once to the largest value this kernel ever uses (one cache entry per kernel),
    never lowered by a later launch with less.
    """
    from ._build import get_kernel, torch_stream
    from ._launch import check_args

    cargs = check_args(plan.filename, plan.kernel, plan.args)
    fn = get_kernel(plan.filename, plan.kernel, max_dynamic_smem=plan.max_shared_mem)
    fn(plan.grid, plan.block, cargs, shared_mem=plan.shared_mem, stream=torch_stream())


def _kernel_ready(x: torch.Tensor) -> torch.Tensor:
    """Contiguous and 16-byte aligned (the kernels read 16-byte vectors), copying only when needed."""
    x = x.contiguous()
    if x.data_ptr() % 16 != 0:
        x = x.clone()
    return x


def moba_centroids_cuda(k: torch.Tensor, block_size: int) -> torch.Tensor:
    """Per-block mean of the keys in fp32: (batch, n_blocks, kv_heads, head_dim), n_blocks = ceil(N / B)."""
    block_size = check_centroid_inputs(k.shape, k.dtype, k.device, block_size)
    k = _kernel_ready(k)
    batch, seqlen, kv_heads, dim = k.shape
    n_blocks = math.ceil(seqlen / block_size)
    with torch.cuda.device(k.device):
        cent = torch.empty((batch, n_blocks, kv_heads, dim), dtype=torch.float32, device=k.device)
        _run(centroid_launch(k, cent, None, None, block_size))
    return cent


def moba_topk_cuda(q: torch.Tensor, k: torch.Tensor, block_size: int, top_k: int, causal: bool = True,
                   centroids: torch.Tensor | None = None) -> torch.Tensor:
    """Selected key blocks per query, int32 (batch, seqlen, heads, top_k); the reference's contract.

    ``centroids`` (fp32, (batch, n_blocks, kv_heads, head_dim), e.g. from :func:`moba_centroids_cuda`)
    skips the centroid pass; they are then split into hi/lo halves of q's dtype.
    """
    c_meta = None if centroids is None else (centroids.shape, centroids.dtype, centroids.device)
    block_size, top_k = check_topk_inputs(q.shape, q.dtype, q.device, k.shape, k.dtype, k.device, block_size,
                                          top_k, causal, centroids=c_meta)
    q = _kernel_ready(q)
    batch, seqlen, heads, dim = q.shape
    kv_heads = k.shape[2]
    n_blocks = math.ceil(seqlen / block_size)
    with torch.cuda.device(q.device):
        hi = torch.empty((batch, kv_heads, n_blocks, dim), dtype=q.dtype, device=q.device)
        lo = torch.empty_like(hi)
        out = torch.empty((batch, seqlen, heads, top_k), dtype=torch.int32, device=q.device)
        if centroids is None:
            cent = torch.empty((batch, n_blocks, kv_heads, dim), dtype=torch.float32, device=q.device)
        else:
            cent = centroids.contiguous()
        _topk_into(q, k, block_size, top_k, causal, centroids is not None, cent, hi, lo, out)
    return out


def _topk_into(q, k, block_size: int, top_k: int, causal: bool, have_centroids: bool, cent, hi, lo, out):
    """The launches of :func:`moba_topk_cuda` into given buffers (validated inputs; tests poison them).

    With ``have_centroids`` the fp32 ``cent`` is read and split; otherwise it is written from ``k``.
    """
    if have_centroids:
        _run(split_launch(cent, hi, lo))
    else:
        _run(centroid_launch(_kernel_ready(k), cent, hi, lo, block_size))
    _run(topk_launch(q, hi, lo, out, block_size, top_k, causal))
