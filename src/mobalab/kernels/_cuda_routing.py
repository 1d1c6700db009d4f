r"""MoBA routing on the GPU: block centroids and the fused per-query top-k (cuda/centroids.cu, cuda/topk.cu).

Same contract as :func:`mobalab.kernels.reference.moba_centroids` / :func:`~mobalab.kernels.reference.moba_topk`:

.. math::
    \bar k_j = \frac{1}{|j|}\sum_{i \in j} k_i \ (\text{fp32}), \qquad s_{t,j} = \langle q_t, \bar k_j\rangle,

causal: slot 0 = own block :math:`\lfloor t/B \rfloor`, then the best :math:`k-1` complete past blocks;
non-causal: the best :math:`k` of all :math:`n = \lceil N/B \rceil` blocks; ranked by (score, block index)
descending, ``-1`` in unused slots (see docs/design.md, "Routing").

The score is computed on tensor cores as :math:`q\cdot c_{hi} + q\cdot c_{lo}` with the fp32 centroid split
into two values of the input dtype (:math:`c_{hi} = T(c)`, :math:`c_{lo} = T(c - c_{hi})`), which is the fp32
score to about :math:`2^{-16}` relative error: indices can differ from the reference only at near-ties. With
``centroid_precision="input"`` (the centroid rounded to T, as MoBA and FlashMoBA store it) the score is
:math:`q\cdot c_{hi}` alone: the kernels' module built with :data:`INPUT_CENTROIDS_DEFINE`, one product per score,
no lo tiles copied.

Three top-k kernels (the router ``variant``): *split* (cuda/topk.cu, ``topk_split_body``: mma.sync m16n8k16 in
CTAs of 8 warps whose rows are scanned by two threads each, one per 32-centroid half of a tile; list tiers 8 and
16, i.e. ``top_k`` <= 17 causal, <= 16 non-causal; every head dim), *mma* (cuda/topk.cu, ``topk_body``: 4 warps,
one thread per row, every supported shape) and *wgmma* (cuda/topk_wgmma.cu: Hopper warpgroup MMAs, asynchronous,
overlapping the next centroid chunk's product with the current chunk's top-k scan; sm_90 GPUs, head dim 64 or
128, list tiers 8 and 16). ``variant=None`` reads the environment variable ``MOBALAB_ROUTER_VARIANT`` at each
call, else the default, "auto": wgmma on sm_90 GPUs at head dim 128 with at least 2048 key blocks, where it has a
kernel (measured against mma's two-barrier 32-centroid tiles: 1.03-1.04x at 2048 blocks, 0.95-0.98x at 1024),
mma elsewhere (split measured no faster; were "split" the default, it would apply at head dims up to 128 only,
:data:`SPLIT_DEFAULT_HEAD_DIMS`: at 256 the split CTA takes 161 KB of shared memory, one per multiprocessor, against
two mma CTAs of 112 KB). A variant chosen by the default falls back to "mma" where it has no kernel (the heap
tier, ``top_k`` > 17 causal or > 16 non-causal), a variant asked for (argument or environment) raises ValueError
there. split and mma select exactly the same blocks (the same score tile; the split scan only skips pairs that
cannot be selected); wgmma computes the same scores up to the fp32 rounding order, so its selections differ only at
near-ties.

What a kernel receives (grid, block, arguments, shared memory) is decided by the plan functions
(:func:`centroid_launch`, :func:`split_launch`, :func:`topk_launch`), plain Python that CI checks against the
CUDA signatures without a GPU; :func:`mobalab.kernels._launch.launch` runs them. Memory comes from torch's
caching allocator; kernels run on torch's current stream; nothing here synchronises with the host.
"""

from __future__ import annotations

import functools
import math

import torch

from . import _contract as C
from ._build import device_capability as _device_capability
from ._build import on_device
from ._launch import Launch, i32, kernel_ready, launch

__all__ = ["moba_centroids_cuda", "moba_topk_cuda"]

# Must match the #defines in cuda/centroids.cu and cuda/topk.cu.
CENTROID_THREADS = 128
TOPK_BM = 128  # query rows per CTA
TOPK_BN = 32  # centroids per streamed tile (topk_body)
SPLIT_BN = 64  # centroids per streamed tile of the split kernel (two 32-column words, one per thread of a row)
TOPK_THREADS = 128
# Must match the #defines in cuda/topk_wgmma.cu.
WGMMA_SOURCE = "topk_wgmma.cu"
# Build options of the wgmma top-k kernel (the same selections), for measuring against the default build
# (scripts/bench_router.py, variant "wgmma+NAME=VALUE"): each descriptor built from its address (the default steps
# them from one per chunk).
WGMMA_BUILD_OPTIONS = ("MOBA_TOPK_WG_STEP_DESC=0",)
# the build of every top-k kernel for centroid_precision "input": the scores q.hi alone (topk.cuh)
INPUT_CENTROIDS_DEFINE = "MOBA_TOPK_CENTROIDS_INPUT=1"
WG_BM = 256  # query rows per CTA (two warpgroups of 128 rows)
WG_BN = 64  # centroids per streamed chunk (hi and lo stacked: a B tile of 2 * WG_BN rows)
WG_THREADS = WG_BM  # one thread per row
WG_HEAD_DIMS = (64, 128)
WG_LIST_TIERS = (8, 16)
WG_ALIGN_BYTES = 1024  # the swizzled tiles start 1024-byte aligned inside dynamic shared memory
# Must match the #defines in cuda/topk.cuh (the split body).
SPLIT_THREADS = 256
SPLIT_LIST_TIERS = (8, 16)
SPLIT_DEFAULT_HEAD_DIMS = (32, 64, 96, 128)  # where a "split" default would apply (head dim 256: "mma")
ROUTER_VARIANTS = ("split", "mma", "wgmma")
ROUTER_CHOICES = ("auto", *ROUTER_VARIANTS)  # what a caller may ask for; "auto" resolves to one of the variants
ROUTER_VARIANT_ENV = "MOBALAB_ROUTER_VARIANT"
# "auto": wgmma on sm_90 GPUs at the head dims of WG_AUTO_HEAD_DIMS where it has a kernel and the sequence has at
# least WG_AUTO_MIN_BLOCKS blocks, mma elsewhere. Measured on an H200 (batch 2, 16 heads, k 8, causal; RESULTS.md),
# wgmma against mma at d 128 is faster the more blocks a row scores; against mma's 32-centroid tiles with two
# barriers per tile (three CTAs per SM): 0.79-0.82x at 64 blocks, 0.81-0.82x at 128, 0.93x at 512, 0.95-0.98x at 1024,
# 1.03-1.04x at 2048 (B 32 to 128, 8K to 256K); at d 64 it is slower (0.81-0.82x at 64 and 1024 blocks).
# split selects exactly what mma selects but is no faster (64K 1.76 against 1.71 ms, 8K 0.134 against 0.141, both
# with 64-centroid tiles), so it stays opt-in.
DEFAULT_ROUTER_VARIANT = "auto"
WG_AUTO_HEAD_DIMS = (128,)
WG_AUTO_MIN_BLOCKS = 2048


# ---------------------------------------------------------------------------------------------------
# launch plans (pure: argument tuples with the exact C scalar types)


def _ptr(t):
    """A tensor passes as itself (check_args takes its data_ptr); a missing optional buffer as NULL."""
    return 0 if t is None else t


def centroid_launch(k: torch.Tensor, cent: torch.Tensor, hi: torch.Tensor | None, lo: torch.Tensor | None,
                    block_size: int) -> Launch:
    """Centroid kernel over k (b, N, g, d) into cent (b, n, g, d) fp32 and, when given, hi/lo (b, g, n, d)."""
    batch, seqlen, kv_heads, dim = k.shape
    n_blocks = math.ceil(seqlen / block_size)
    name = f"moba_centroids_{C.dtype_tag(k.dtype, 'centroids.cu')}_d{dim}"
    args = (k, cent, _ptr(hi), _ptr(lo), i32(seqlen), i32(n_blocks), i32(kv_heads),
            i32(block_size))
    return Launch("centroids.cu", name, (n_blocks, kv_heads, batch), (CENTROID_THREADS, 1, 1), args)


def split_launch(cent: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor) -> Launch:
    """Split given fp32 centroids (b, n, g, d) into hi/lo (b, g, n, d) of hi's dtype."""
    batch, n_blocks, kv_heads, dim = cent.shape
    name = f"moba_split_centroids_{C.dtype_tag(hi.dtype, 'centroids.cu')}"
    args = (cent, hi, lo, i32(n_blocks), i32(kv_heads), i32(dim))
    return Launch("centroids.cu", name, (n_blocks, kv_heads, batch), (dim, 1, 1), args)


def topk_list_tier(top_k: int, causal: bool) -> int:
    """Kernel tier by list length (top_k - 1 causal, top_k otherwise): 8 and 16 keep the per-row lists in
    registers, 64 in a shared-memory heap."""
    list_cap = top_k - 1 if causal else top_k
    return 8 if list_cap <= 8 else 16 if list_cap <= 16 else 64


def topk_bn(dim: int, bn: int = TOPK_BN) -> int:
    """Centroids per streamed tile of topk_body: ``bn`` (the build option MOBA_TOPK_BN, 32 by default: small
    tiles leave room for three or four CTAs per multiprocessor), always 32 at head dim 256."""
    return 32 if dim >= 256 else bn


def topk_shared_bytes(dim: int, top_k: int, causal: bool, itemsize: int = 2, bn: int = TOPK_BN) -> int:
    """Dynamic shared memory of one top-k CTA: Q tile, hi/lo centroid tiles, score tile, tier-64 heaps
    (``bn``: the kernel's MOBA_TOPK_BN)."""
    list_cap = top_k - 1 if causal else top_k
    lists = list_cap * TOPK_BM * 8 if topk_list_tier(top_k, causal) == 64 else 0
    tile = topk_bn(dim, bn)
    return (TOPK_BM * dim + 2 * tile * dim) * itemsize + TOPK_BM * tile * 4 + lists


def split_topk_shared_bytes(dim: int, itemsize: int = 2) -> int:
    """Dynamic shared memory of one split top-k CTA: Q tile, hi/lo tiles of 64 centroids, the fp32 score tile and
    the two halves' thresholds (TOPK_BM floats each)."""
    return (TOPK_BM * dim + 2 * SPLIT_BN * dim) * itemsize + TOPK_BM * SPLIT_BN * 4 + 2 * TOPK_BM * 4


def split_router_supports(top_k: int, causal: bool) -> bool:
    """Whether the split kernel covers this list length (register-list tiers only; every head dim)."""
    return topk_list_tier(top_k, causal) in SPLIT_LIST_TIERS


def wgmma_topk_shared_bytes(dim: int) -> int:
    """Dynamic shared memory of one wgmma top-k CTA: the Q tile, two stacked hi/lo centroid chunks (all
    128-byte swizzled, 2-byte elements), the fp32 score tile and the 1024-byte alignment slack."""
    return WG_BM * dim * 2 + 2 * (2 * WG_BN) * dim * 2 + WG_BM * WG_BN * 4 + WG_ALIGN_BYTES


def wgmma_router_supports(head_dim: int, top_k: int, causal: bool) -> bool:
    """Whether cuda/topk_wgmma.cu has a kernel for this head dim and list length (register-list tiers only)."""
    return head_dim in WG_HEAD_DIMS and topk_list_tier(top_k, causal) in WG_LIST_TIERS


@functools.lru_cache(maxsize=256)  # asked twice per training step, while the GPU may wait for the first launches
def _auto_variant(head_dim: int | None, top_k: int | None, causal: bool, device: torch.device | None,
                  n_blocks: int | None) -> str:
    """What "auto" runs: wgmma on an sm_90 CUDA device at a head dim of WG_AUTO_HEAD_DIMS, with at least
    WG_AUTO_MIN_BLOCKS blocks, where it has a kernel for the list length; mma elsewhere, and where the shape, the
    block count or the device is not given."""
    if head_dim is None or top_k is None or n_blocks is None or device is None or torch.device(device).type != "cuda":
        return "mma"
    if head_dim not in WG_AUTO_HEAD_DIMS or n_blocks < WG_AUTO_MIN_BLOCKS \
            or not wgmma_router_supports(head_dim, top_k, causal):
        return "mma"
    return "wgmma" if _device_capability(device) == (9, 0) else "mma"


def _variant_problem(variant: str, head_dim: int | None, top_k: int | None, causal: bool,
                     device: torch.device | None) -> str | None:
    """Why ``variant`` has no kernel for the shape or device (None: it has one)."""
    shape_known = head_dim is not None and top_k is not None
    if variant == "split":
        if top_k is not None and not split_router_supports(top_k, causal):
            return (f"top_k <= {max(SPLIT_LIST_TIERS) + 1} (causal) or <= {max(SPLIT_LIST_TIERS)} (non-causal), "
                    f"got top_k={top_k}, causal={causal}")
        return None
    if variant != "wgmma":
        return None
    if shape_known and not wgmma_router_supports(head_dim, top_k, causal):
        return (f"head_dim in {WG_HEAD_DIMS} and top_k <= {max(WG_LIST_TIERS) + 1} (causal) or "
                f"<= {max(WG_LIST_TIERS)} (non-causal), got head_dim={head_dim}, top_k={top_k}, causal={causal}")
    if device is not None and torch.device(device).type == "cuda":
        cap = _device_capability(device)
        if cap != (9, 0):
            return f"an sm_90 (Hopper) GPU, got compute capability {cap}"
    return None


def resolve_router_variant(variant: str | None, head_dim: int | None = None, top_k: int | None = None,
                           causal: bool = True, device: torch.device | None = None,
                           n_blocks: int | None = None) -> str:
    """The top-k kernel that runs: ``variant``, or ``$MOBALAB_ROUTER_VARIANT`` when None, else the default
    (DEFAULT_ROUTER_VARIANT, "auto"). "auto" (asked for or the default) is wgmma on an sm_90 GPU at head dim 128
    with at least WG_AUTO_MIN_BLOCKS (2048) key blocks (``n_blocks``) where wgmma has a kernel for the list length,
    mma elsewhere (and where the shape, the block count or the device is not given).

    "split" needs a register-list tier (checked when ``top_k`` is given); "wgmma" needs an sm_90 GPU (checked when
    ``device`` is a CUDA device) and a kernel for the shape (checked when ``head_dim`` and ``top_k`` are given):
    where one is missing, a default choice becomes "mma" and an explicit one (argument or environment) raises
    ValueError. A "split" default becomes "mma" at head dims outside SPLIT_DEFAULT_HEAD_DIMS.
    """
    forced = variant is not None
    if variant is None:
        variant = C.getenv(ROUTER_VARIANT_ENV)
        forced = variant is not None
        if variant is None:
            variant = DEFAULT_ROUTER_VARIANT
    if variant not in ROUTER_CHOICES:
        raise ValueError(f"router variant must be one of {ROUTER_CHOICES} (or None: ${ROUTER_VARIANT_ENV}, "
                         f"default {DEFAULT_ROUTER_VARIANT!r}), got {variant!r}")
    if variant == "auto":
        return _auto_variant(head_dim, top_k, causal, device, n_blocks)
    if not forced and variant == "split" and head_dim is not None and head_dim not in SPLIT_DEFAULT_HEAD_DIMS:
        return "mma"
    problem = _variant_problem(variant, head_dim, top_k, causal, device)
    if problem is None:
        return variant
    if forced:
        raise ValueError(f"router variant {variant!r} needs {problem}; use 'mma'")
    return "mma"


def topk_launch(q: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor, out: torch.Tensor, block_size: int,
                top_k: int, causal: bool, query_offset: int = 0, variant: str | None = None,
                fold_blocks: int = 0, defines: tuple[str, ...] = (), centroid_precision: str = "fp32") -> Launch:
    """Fused top-k kernel: q (b, N, h, d), hi/lo (b, g, n, d) -> out int32 (b, N, h, top_k); row i of q sits at
    position ``query_offset + i`` of the centroids' sequence (causal: own block, candidates before it);
    ``variant`` as :func:`resolve_router_variant` (None: the environment, else the default). ``fold_blocks``:
    block j selected in sequence β is written as β · fold_blocks + j (-1 stays), the numbering of
    :func:`mobalab.kernels._batch_fold.folded_topk` when it is n; 0: as selected. ``defines``: build options of
    the kernel's module (``"NAME=value"``), planned with the shared memory they need (MOBA_TOPK_BN of topk.cu).
    ``centroid_precision`` "input": scores from ``hi`` alone (``lo`` is passed but never read)."""
    if centroid_precision == "input":
        defines = (*defines, INPUT_CENTROIDS_DEFINE)
    batch, seqlen, heads, dim = q.shape
    kv_heads, n_blocks = hi.shape[1], hi.shape[2]
    tier = topk_list_tier(top_k, causal)
    args = (q, hi, lo, out, i32(seqlen), i32(heads), i32(kv_heads), i32(block_size),
            i32(n_blocks), i32(top_k), i32(query_offset), i32(fold_blocks))
    mode = "causal" if causal else "full"
    chosen = resolve_router_variant(variant, dim, top_k, causal, q.device, n_blocks)
    if chosen == "wgmma":
        name = f"moba_topk_wg_{C.dtype_tag(q.dtype, WGMMA_SOURCE)}_d{dim}_{mode}_k{tier}"
        grid = (math.ceil(seqlen / WG_BM), heads, batch)  # one thread per row
        return Launch(WGMMA_SOURCE, name, grid, (WG_THREADS, 1, 1), args, shared_mem=wgmma_topk_shared_bytes(dim),
                      defines=defines)
    grid = (math.ceil(seqlen / TOPK_BM), heads, batch)
    if chosen == "split":
        name = f"moba_topk_{C.dtype_tag(q.dtype, 'topk.cu')}_d{dim}_{mode}_k{tier}_split"
        return Launch("topk.cu", name, grid, (SPLIT_THREADS, 1, 1), args, shared_mem=split_topk_shared_bytes(dim),
                      defines=defines)
    name = f"moba_topk_{C.dtype_tag(q.dtype, 'topk.cu')}_d{dim}_{mode}_k{tier}"
    bn = next((int(d.split("=", 1)[1]) for d in defines if d.startswith("MOBA_TOPK_BN=")), TOPK_BN)
    return Launch("topk.cu", name, grid, (TOPK_THREADS, 1, 1), args, defines=defines,
                  shared_mem=topk_shared_bytes(dim, top_k, causal, bn=bn))


# ---------------------------------------------------------------------------------------------------
# running


def moba_centroids_cuda(k: torch.Tensor, block_size: int) -> torch.Tensor:
    """Per-block mean of the keys in fp32: (batch, n_blocks, kv_heads, head_dim), n_blocks = ceil(N / B)."""
    fn = "moba_centroids_cuda"
    C.check_keys(fn, k, path="cuda")
    block_size = C.check_block_size(fn, block_size, "cuda")
    C.check_cuda_device(fn, k)
    k = kernel_ready(k)
    batch, seqlen, kv_heads, dim = k.shape
    n_blocks = math.ceil(seqlen / block_size)
    with on_device(k.device):
        cent = torch.empty((batch, n_blocks, kv_heads, dim), dtype=torch.float32, device=k.device)
        launch(centroid_launch(k, cent, None, None, block_size))
    return cent


def moba_topk_cuda(q: torch.Tensor, k: torch.Tensor, block_size: int, top_k: int, causal: bool = True,
                   centroids: torch.Tensor | None = None, *, variant: str | None = None,
                   centroid_precision: str = "fp32") -> torch.Tensor:
    """Selected key blocks per query, int32 (batch, seqlen, heads, top_k); the reference's contract.

    ``centroids`` (fp32, (batch, n_blocks, kv_heads, head_dim), e.g. from :func:`moba_centroids_cuda`)
    skips the centroid pass; they are then split into hi/lo halves of q's dtype. ``variant``: the top-k
    kernel, "split", "mma" or "wgmma" (None: ``$MOBALAB_ROUTER_VARIANT``, else the default; see
    :func:`resolve_router_variant`). ``centroid_precision``: "fp32" or "input" (the centroids rounded to q's
    dtype before scoring), as :func:`mobalab.kernels.reference.moba_topk`.
    """
    fn = "moba_topk_cuda"
    C.check_inputs(fn, q, k, path="cuda")
    block_size = C.check_block_size(fn, block_size, "cuda")
    top_k = C.check_top_k(fn, top_k, "cuda")
    causal = C.check_flag(fn, "causal", causal)
    centroid_precision = C.check_centroid_precision(fn, centroid_precision)
    if centroids is not None:
        C.check_centroids(fn, centroids, k, block_size)
    try:  # the name and the shape here, so CPU tensors reach the message; the device in topk_cuda_checked
        resolve_router_variant(variant, q.shape[-1], top_k, causal, None, math.ceil(q.shape[1] / block_size))
    except ValueError as exc:
        raise ValueError(f"{fn}: {exc}") from None
    C.check_cuda_device(fn, q)
    with on_device(q.device):
        return topk_cuda_checked(q, k, block_size, top_k, causal, centroids, variant, fn=fn,
                                 centroid_precision=centroid_precision)


def topk_cuda_checked(q, k, block_size: int, top_k: int, causal: bool, centroids=None, variant: str | None = None,
                      *, fn: str = "moba_topk_cuda", fold: bool = False, centroid_precision: str = "fp32"):
    """:func:`moba_topk_cuda` for inputs it would accept, on q's device (the current one): the routing of a training
    step, whose entry has checked the inputs. ``variant`` as :func:`resolve_router_variant`, whose refusal is
    raised in the name of ``fn``. ``fold``: the blocks numbered for the batch's sequences end to end
    (:func:`mobalab.kernels._batch_fold.folded_topk` of the routing), written so by the top-k kernel."""
    try:
        variant = resolve_router_variant(variant, q.shape[-1], top_k, causal, q.device,
                                         math.ceil(q.shape[1] / block_size))
    except ValueError as exc:
        raise ValueError(f"{fn}: {exc}") from None
    q = kernel_ready(q)
    batch, seqlen, heads, dim = q.shape
    kv_heads = k.shape[2]
    n_blocks = math.ceil(seqlen / block_size)
    hi = torch.empty((batch, kv_heads, n_blocks, dim), dtype=q.dtype, device=q.device)
    lo = torch.empty_like(hi)
    out = torch.empty((batch, seqlen, heads, top_k), dtype=torch.int32, device=q.device)
    if centroids is None:
        cent = torch.empty((batch, n_blocks, kv_heads, dim), dtype=torch.float32, device=q.device)
    else:
        cent = centroids.contiguous()
    topk_into(q, k, block_size, top_k, causal, centroids is not None, cent, hi, lo, out, variant=variant,
              fold_blocks=n_blocks if fold else 0, centroid_precision=centroid_precision)
    return out


def topk_into(q, k, block_size: int, top_k: int, causal: bool, have_centroids: bool, cent, hi, lo, out,
              variant: str | None = None, fold_blocks: int = 0, centroid_precision: str = "fp32"):
    """The launches of :func:`moba_topk_cuda` into given buffers (validated inputs; tests poison them).

    With ``have_centroids`` the fp32 ``cent`` is read and split; otherwise it is written from ``k``.
    ``variant``: the top-k kernel (:func:`resolve_router_variant`); ``fold_blocks`` and ``centroid_precision`` as
    :func:`topk_launch` (the hi halves are the centroids rounded to q's dtype either way).
    """
    if have_centroids:
        launch(split_launch(cent, hi, lo))
    else:
        launch(centroid_launch(kernel_ready(k), cent, hi, lo, block_size))
    launch(topk_launch(q, hi, lo, out, block_size, top_k, causal, variant=variant, fold_blocks=fold_blocks,
                       centroid_precision=centroid_precision))
