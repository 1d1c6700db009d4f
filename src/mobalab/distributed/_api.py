"""The public entry of context parallelism: argument checks, the cross-rank agreement check, the ring."""

from __future__ import annotations

import struct

import torch
import torch.distributed as dist

from ..kernels import _contract as C
from ._group import all_gather_rows, ring_of
from ._layout import LAYOUTS, Layout
from ._local import Params
from ._ring import Plan, RingMoBA

__all__ = ["context_parallel_moba_attention"]

KERNEL_MODES = ("auto", "reference")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# what every rank must agree on, in the order of the agreement row
_AGREED = ("batch", "heads", "kv_heads", "head_dim", "dtype", "block_size", "top_k", "causal", "softmax_scale",
           "layout", "kernels", "centroid_precision", "requires_grad")


def _check_local(fn, q, k, v, block_size, top_k, causal, softmax_scale, return_lse, layout, kernels,
                 centroid_precision):
    """Checks that need no communication; returns (block_size, top_k, scale)."""
    C.check_inputs(fn, q, k, v, path="reference")
    block_size = C.check_block_size(fn, block_size, "reference")
    top_k = C.check_top_k(fn, top_k, "reference")
    C.check_flag(fn, "causal", causal)
    C.check_flag(fn, "return_lse", return_lse)
    scale = C.check_softmax_scale(fn, softmax_scale, q.shape[-1])
    if layout not in LAYOUTS:
        raise ValueError(f"{fn}: layout must be one of {LAYOUTS}, got {layout!r}")
    if kernels not in KERNEL_MODES:
        raise ValueError(f"{fn}: kernels must be one of {KERNEL_MODES}, got {kernels!r}")
    C.check_centroid_precision(fn, centroid_precision)
    return block_size, top_k, scale


def _check_group(fn, group) -> str:
    """Checks of the group itself, which a rank must pass to talk to the others at all; returns its backend."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(f"{fn}: torch.distributed is not initialized; call torch.distributed.init_process_group "
                         "first (torchrun sets up the environment)")
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{fn}: group must be a torch.distributed ProcessGroup or None, got {type(group).__name__}")
    if dist.get_rank(group) < 0:
        raise ValueError(f"{fn}: this process is not a member of the group it was given")
    return str(dist.get_backend(group)).lower()


def _check_device(fn, q, backend: str) -> None:
    if backend == "nccl" and not q.is_cuda:
        raise ValueError(f"{fn}: the group's backend is NCCL, which needs CUDA tensors; q is on {q.device}")
    if backend == "gloo" and q.device.type != "cpu":
        raise ValueError(f"{fn}: the group's backend is gloo, which moves CPU tensors here; q is on {q.device} "
                         "(use NCCL for CUDA tensors)")


def _row_device(q, backend: str) -> torch.device:
    """Where this rank's agreement row goes: a device the backend serves even when q is not a tensor there
    (a rank with a CPU q under NCCL must still flag its error to the others, not leave them waiting)."""
    if backend == "gloo":
        return torch.device("cpu")
    if backend == "nccl":
        return q.device if isinstance(q, torch.Tensor) and q.is_cuda else torch.device(
            "cuda", torch.cuda.current_device())
    return q.device if isinstance(q, torch.Tensor) else torch.device("cpu")


def _agreement_row(q, k, v, block_size, top_k, causal, scale, layout, kernels, centroid_precision) -> list[int]:
    batch, length, heads, dim = q.shape
    scale_bits = struct.unpack("<q", struct.pack("<d", scale))[0]
    # a rank whose call records no graph would never join the others' backward ring
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    return [batch, heads, k.shape[2], dim, _DTYPES.index(q.dtype), block_size, top_k, int(causal), scale_bits,
            LAYOUTS.index(layout), KERNEL_MODES.index(kernels), C.CENTROID_PRECISIONS.index(centroid_precision),
            int(grad), length]


def _readable(name: str, value: int):
    """An agreement-row entry as the caller wrote it."""
    if name == "dtype":
        return str(_DTYPES[value])
    if name == "softmax_scale":
        return struct.unpack("<d", struct.pack("<q", value))[0]
    if name in ("causal", "requires_grad"):
        return bool(value)
    if name == "layout":
        return LAYOUTS[value]
    if name == "kernels":
        return KERNEL_MODES[value]
    if name == "centroid_precision":
        return C.CENTROID_PRECISIONS[value]
    return value


def context_parallel_moba_attention(q, k, v, block_size: int, top_k: int, causal: bool = True, group=None,
                                    softmax_scale: float | None = None, return_lse: bool = False, *,
                                    layout: str = "contiguous", kernels: str = "auto",
                                    centroid_precision: str = "fp32"):
    r"""MoBA attention of one long sequence sharded over the ranks of ``group``: each rank passes its shard.

    Rank r holds the tokens of its shard: ``q`` (batch, L_r, heads, d), ``k`` and ``v`` (batch, L_r, kv_heads,
    d), the same tokens for all three. With ``layout="contiguous"`` (default) the shards are consecutive
    pieces of the sequence in rank order; ``"zigzag"`` gives rank r the pieces r and 2R-1-r of a cut into
    2R (:func:`shard_positions` says which positions a rank holds; zigzag balances causal routing, whose
    cost grows with position). Shard lengths may differ and cut blocks anywhere. The result equals
    single-device :func:`mobalab.kernels.moba_attention` on the whole sequence (same selections, up to
    rounding):

    .. math::
        o_t = \sum_{i \in S_t} \mathrm{softmax}_i(\sigma\, q_t\cdot k_i)\, v_i ,

    with :math:`S_t` the keys of the blocks routed for (t, head) at t's global position (docs/design.md,
    "MoBA semantics"). Routing: all-gather of per-block key sums, then the top-k rule on every rank for its
    queries. Attention: K/V shards travel around the ring (``torch.distributed`` P2P, overlapped with the
    computation), partial results combine by log-sum-exp. Differentiable once w.r.t. q, k and v (routing is
    hard; a second derivative through the attention raises); in backward the gradients of K/V travel the ring
    back to their owners. Every rank must make the same calls, forward and backward. Every rank checks its
    arguments, then meets the others in one small all-gather: where a rank's arguments are invalid (not
    tensors, the wrong device for the group's backend, ...) or the ranks disagree on a setting, a shape other
    than the shard length, or whether the call records a graph for backward (grad mode and ``requires_grad``
    of q, k, v), every rank raises (a ``group`` that is not a process group holding the rank raises on that
    rank alone: it cannot reach the others).

    Returns ``out`` (batch, L_r, heads, d) in q's dtype and, with ``return_lse``, ``lse`` (batch, L_r, heads) in
    float32 (float64 for float64 inputs; its gradient is honoured). ``group``: the process group (None: the
    default group), NCCL with CUDA tensors or gloo with CPU tensors. ``kernels``: "auto" runs the CUDA kernels
    where they can do a step's work (CUDA tensors of a dtype, head dim, block size and top-k the CUDA path
    supports) and the torch reference elsewhere; "reference" always runs the reference. ``centroid_precision``:
    the routing's centroids, "fp32" or "input" (rounded to k's dtype), as in :func:`mobalab.kernels.moba_topk`.

    Examples
    --------
    In a single process (a group of one) the result is plain MoBA:

    >>> import os, tempfile, torch, torch.distributed as dist
    >>> from mobalab.kernels import moba_attention
    >>> store = os.path.join(tempfile.mkdtemp(), "store")  # the file store removes the file when done
    >>> dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    >>> g = torch.Generator().manual_seed(0)
    >>> q, k, v = (torch.randn(1, 12, 2, 8, generator=g) for _ in range(3))
    >>> out = context_parallel_moba_attention(q, k, v, block_size=4, top_k=2)
    >>> torch.allclose(out, moba_attention(q, k, v, 4, 2), atol=1e-6)
    True
    >>> dist.destroy_process_group()
    """
    fn = "context_parallel_moba_attention"
    local_error = None
    try:
        block_size, top_k, scale = _check_local(fn, q, k, v, block_size, top_k, causal, softmax_scale, return_lse,
                                                layout, kernels, centroid_precision)
    except (TypeError, ValueError) as exc:
        if not dist.is_available() or not dist.is_initialized():
            raise  # nobody to tell: no row can be sent
        local_error = exc
    backend = _check_group(fn, group)
    if local_error is None:
        try:
            _check_device(fn, q, backend)
        except ValueError as exc:
            local_error = exc
    ring = ring_of(group)
    # A rank whose own arguments fail still takes part in the all-gather, flagged, so that the other ranks
    # raise too instead of waiting in the collective until the group's timeout.
    agreed = [0] * (len(_AGREED) + 1) if local_error is not None else _agreement_row(
        q, k, v, block_size, top_k, causal, scale, layout, kernels, centroid_precision)
    row = torch.tensor([int(local_error is not None), *agreed], dtype=torch.int64,
                       device=_row_device(q, backend))
    flagged = all_gather_rows(row, ring).tolist()
    if local_error is not None:
        raise local_error
    failed = [rank for rank, r in enumerate(flagged) if r[0]]
    if failed:
        raise ValueError(f"{fn}: rank{'s' if len(failed) > 1 else ''} {', '.join(map(str, failed))} of the group "
                         f"(of {ring.world}) rejected its arguments and raised; see that rank's error. Every rank "
                         "stops here, so that none is left waiting for the others")
    rows = [r[1:] for r in flagged]
    differing = {name: [_readable(name, r[i]) for r in rows] for i, name in enumerate(_AGREED)
                 if len({r[i] for r in rows}) > 1}
    if differing:  # every rank sees the same rows, so every rank raises: nobody is left waiting
        grad = ("; and every rank or none must record a graph for backward (grad mode on and q, k or v "
                "requiring grad), since backward runs the ring on every rank") if "requires_grad" in differing else ""
        raise ValueError(f"{fn}: the ranks disagree on {', '.join(differing)}; every rank must pass the same "
                         f"settings and shapes except the shard length{grad} (per rank: {differing})")
    lengths = tuple(r[-1] for r in rows)
    plan = Plan(Layout(lengths, layout), ring, Params(block_size, top_k, causal, scale, centroid_precision), kernels)
    out, lse = RingMoBA.apply(q, k, v, plan)
    return (out, lse) if return_lse else out
