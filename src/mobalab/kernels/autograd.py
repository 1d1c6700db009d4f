r"""Differentiable MoBA attention: a ``torch.library`` custom op with the CUDA backward (cuda/attention_bwd.cu).

Forward (op ``mobalab::moba_attention_fwd``): route (hard top-k, no gradient), then the key-block-major
forward of :mod:`mobalab.kernels.attention`; it returns and saves the output, the natural-log LSE and the
routing. Backward (op ``mobalab::moba_attention_bwd``), with recomputation and no N x N or N x n buffer:

.. math::
    D_t = \textstyle\sum_c dO_{t,c}\, O_{t,c} - d\mathrm{lse}_t, \qquad
    P = e^{\sigma q k^\top - \mathrm{lse}}, \qquad dV_j \mathrel{+}= P^\top dO, \qquad
    dS = P \circ (dO\, V_j^\top - D), \qquad dK_j \mathrel{+}= \sigma\, dS^\top Q, \qquad
    dQ \mathrel{+}= \sigma\, dS\, K_j ,

per (kv head, 64-key sub-tile of key block j) over the (query, head) rows that selected j, gathered in
tiles of 64 (so tensor-core tiles are full); GQA sums dK/dV over the query heads of a kv head because one
kv head's rows come from all of its query heads. Routing is hard: no gradient reaches centroids or scores.

Determinism. ``deterministic=False`` (default) adds each tile's dQ contribution to an fp32
(batch, seqlen, heads, d) accumulator with float atomics: the order of additions, hence the last bits of
dQ, can change from run to run (dK and dV are always bit-reproducible: each element has one writer).
``deterministic=True`` writes per-(query, head, slot) fp32 partials instead (key sub-tiles of one block in
separate launches, in order) and a merge sums the slots in slot order: bit-identical gradients run to run,
at the cost of ``4 d`` bytes of scratch per (query, head, slot) (bounded by chunking), extra traffic and
less overlap (the sub-tile launches of a block run one after another, so a very long key-block list is
waited for once per sub-tile): on the benchmark the deterministic fwd+bwd took 1.5x (d = 64) to 5x
(clustered routing, B = 128) the default's time.

CUDA tensors run the kernels; CPU tensors run the same op through the torch reference (used to test the op's
plumbing, ``torch.compile`` and ``gradcheck`` without a GPU). ``torch.compile`` sees both ops as opaque
custom ops (fake implementations give the shapes), so there is no graph break.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from . import _contract as C
from . import attention as A
from . import reference as R

__all__ = [
    "moba_attention_autograd",
    "moba_attention_backward_cuda",
    "bwd_kernel_names",
    "bwd_smem_bytes",
    "bwd_bytes_per_pair",
    "bwd_plan",
    "delta_args",
    "rows_args",
    "bwd_args",
    "dq_merge_args",
    "n_key_subtiles",
    "SOURCE",
]

SOURCE = "attention_bwd.cu"
ROWS = 64  # gathered rows per tile (MOBA_BWD_ROWS)
KEYS = 64  # keys per CTA (MOBA_BWD_KEYS)
BWD_THREADS = 128
ROW_THREADS = 256
LOG2E = 1.4426950408889634
ROW_INFO_BYTES = 16


# --------------------------------------------------------------------------------------------------
# sizes and plans (pure)


def n_key_subtiles(block_size: int) -> int:
    """CTAs per key block: 64-key sub-tiles (a block of 16 or 32 keys fills part of one)."""
    return max(1, math.ceil(block_size / KEYS))


def bwd_smem_bytes(head_dim: int) -> int:
    """Dynamic shared memory of the main kernel: K, V, 2 x Q, 2 x dO tiles, dS^T (64 x 64), 3 x 64 row records."""
    return 6 * ROWS * head_dim * 2 + KEYS * ROWS * 2 + 3 * ROWS * ROW_INFO_BYTES


def bwd_bytes_per_pair(head_dim: int, deterministic: bool) -> int:
    """Scratch per (query, head, slot): segment key, sort output and temp, row record (+ fp32 dQ partial)."""
    return 64 + (4 * head_dim if deterministic else 0)


def bwd_plan(batch, seqlen, heads, kv_heads, head_dim, top_k, deterministic, budget_bytes=None):
    """Chunks for the backward: the forward's planner with the backward's scratch per pair."""
    if budget_bytes is None:
        budget_bytes = A.scratch_budget_bytes(batch, seqlen, heads, kv_heads, head_dim)
    # plan_chunks sizes with the forward's bytes per pair; rescale the budget to the backward's.
    scaled = int(budget_bytes * A.bytes_per_pair(head_dim) / bwd_bytes_per_pair(head_dim, deterministic))
    return A.plan_chunks(batch, seqlen, heads, kv_heads, head_dim, top_k, max(1, scaled))


def bwd_kernel_names(dtype: torch.dtype, head_dim: int) -> tuple[str, str, str]:
    """(delta kernel, main kernel, deterministic dQ merge kernel) for these inputs."""
    tag = {torch.bfloat16: "bf16", torch.float16: "f16"}[dtype]
    return (f"moba_bwd_delta_{tag}_d{head_dim}", f"moba_bwd_{tag}_d{head_dim}",
            f"moba_bwd_dq_merge_{tag}_d{head_dim}")


def dkv_mode(chunk: A.Chunk, seqlen: int) -> int:
    """0: the chunk covers whole sequences (dK/dV written once, in the input dtype); else fp32 store/add."""
    if chunk.t0 == 0 and chunk.n_q == seqlen:
        return 0
    return 1 if chunk.t0 == 0 else 2


# --------------------------------------------------------------------------------------------------
# argument tuples (pure functions: the CPU tests pass them through _launch.check_args)


def delta_args(out, dout, delta, n_rows):
    return (out, dout, delta, np.int64(n_rows))


def rows_args(pairs, sorted_keys, lse, delta, rows, n_pairs, n_seg, *, seqlen, heads, top_k, chunk: A.Chunk):
    return (pairs, sorted_keys, lse, delta, rows, np.int64(n_pairs), np.int32(n_seg), np.int32(seqlen),
            np.int32(heads), np.int32(top_k), np.int32(chunk.batch_index), np.int32(chunk.h0),
            np.int32(chunk.n_q), np.int32(chunk.t0))


def bwd_args(q, k, v, dout, rows, pairs, seg_off, dq_acc, part_dq, dk, dv, dk_acc, dv_acc, *, seqlen, heads,
             kv_heads, block_size, n_blocks, chunk: A.Chunk, n_seg, causal, scale, sub0, n_sub_launch, dq_mode,
             dkv_mode):
    return (q, k, v, dout, rows, pairs, seg_off, dq_acc, part_dq, dk, dv, dk_acc, dv_acc, np.int32(seqlen),
            np.int32(heads), np.int32(kv_heads), np.int32(block_size), np.int32(n_blocks),
            np.int32(chunk.batch_index), np.int32(chunk.h0), np.int32(n_seg), np.int32(1 if causal else 0),
            np.float32(scale), np.float32(scale * LOG2E), np.int32(sub0), np.int32(n_sub_launch),
            np.int32(dq_mode), np.int32(dkv_mode))


def dq_merge_args(part_dq, topk, dq, *, seqlen, heads, top_k, n_blocks, chunk: A.Chunk):
    return (part_dq, topk, dq, np.int32(seqlen), np.int32(heads), np.int32(top_k), np.int32(n_blocks),
            np.int32(chunk.batch_index), np.int32(chunk.h0), np.int32(chunk.n_heads), np.int32(chunk.t0),
            np.int32(chunk.n_q))


# --------------------------------------------------------------------------------------------------
# the CUDA backward


def moba_attention_backward_cuda(dout, q, k, v, out, lse, topk, block_size: int, top_k: int, causal: bool,
                                 scale: float, deterministic: bool = False, dlse=None):
    """dq, dk, dv of MoBA attention given the forward's ``out``, natural-log ``lse`` and routing ``topk``.

    Shapes as in :func:`mobalab.kernels.attention.moba_attention_cuda`; ``dlse`` (batch, seqlen, heads)
    is the gradient w.r.t. the returned LSE, or None. Gradients come back in the input dtype.
    """
    from ._launch import launch

    with torch.cuda.device(q.device):
        q, k, v, out, dout = (A._prepare(x) for x in (q, k, v, out, dout.to(q.dtype)))
        lse = lse.float().contiguous()
        topk = topk.to(torch.int32).contiguous()
        batch, seqlen, heads, dim = q.shape
        kv_heads = k.shape[2]
        group = heads // kv_heads
        n_blocks = math.ceil(seqlen / block_size)
        device = q.device
        delta_name, main_name, merge_name = bwd_kernel_names(q.dtype, dim)

        n_rows = batch * seqlen * heads
        delta = torch.empty(n_rows, dtype=torch.float32, device=device)
        launch(SOURCE, delta_name, (math.ceil(n_rows / (ROW_THREADS // 32)),), (ROW_THREADS,),
               delta_args(out, dout, delta, n_rows))
        if dlse is not None:
            delta.sub_(dlse.float().reshape(-1))

        chunks = bwd_plan(batch, seqlen, heads, kv_heads, dim, top_k, deterministic)
        max_pairs = max(c.n_heads * c.n_q for c in chunks) * top_k
        max_seg = max(c.n_heads // group for c in chunks) * n_blocks
        keys = torch.empty(max_pairs, dtype=torch.int32, device=device)
        rows = torch.empty(max_pairs * ROW_INFO_BYTES // 4, dtype=torch.float32, device=device)
        seg_off = torch.empty(max_seg + 1, dtype=torch.int64, device=device)
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        split = any(dkv_mode(c, seqlen) != 0 for c in chunks)
        if split:
            dk_acc = torch.empty(k.shape, dtype=torch.float32, device=device)
            dv_acc = torch.empty(v.shape, dtype=torch.float32, device=device)
        else:
            dk_acc, dv_acc = dk, dv  # unused by the kernel (dkv_mode 0)
        if deterministic:
            dq = torch.empty_like(q)
            part_dq = torch.empty(max_pairs * dim, dtype=torch.float32, device=device)
            dq_acc = part_dq  # unused (dq_mode 1/2)
        else:
            dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=device)
            part_dq = dq_acc  # unused (dq_mode 0)

        smem = bwd_smem_bytes(dim)
        n_sub = n_key_subtiles(block_size)
        for c in chunks:
            n_pairs = c.n_heads * c.n_q * top_k
            n_seg = (c.n_heads // group) * n_blocks
            keys_c = keys[:n_pairs]
            launch(A.SOURCE, "moba_attn_keys", (min(4096, math.ceil(n_pairs / 256)),), (256,),
                   A.keys_args(topk, keys_c, seqlen, heads, top_k, n_blocks, c, group))
            sorted_keys, pairs = torch.sort(keys_c, stable=True)  # the forward's (deterministic) lists
            launch(A.SOURCE, "moba_attn_bounds", (min(4096, math.ceil((n_pairs + 1) / 256)),), (256,),
                   A.bounds_args(sorted_keys, n_pairs, n_seg, seg_off))
            launch(SOURCE, "moba_bwd_rows", (min(4096, math.ceil(n_pairs / ROW_THREADS)),), (ROW_THREADS,),
                   rows_args(pairs, sorted_keys, lse, delta, rows, n_pairs, n_seg, seqlen=seqlen, heads=heads,
                             top_k=top_k, chunk=c))
            mode_kv = dkv_mode(c, seqlen)
            common = dict(seqlen=seqlen, heads=heads, kv_heads=kv_heads, block_size=block_size,
                          n_blocks=n_blocks, chunk=c, n_seg=n_seg, causal=causal, scale=scale, dkv_mode=mode_kv)
            if deterministic:
                for sub in range(n_sub):  # fixed order: sub-tile 0 stores the partial, later ones add
                    launch(SOURCE, main_name, (n_seg,), (BWD_THREADS,),
                           bwd_args(q, k, v, dout, rows, pairs, seg_off, dq_acc, part_dq, dk, dv, dk_acc, dv_acc,
                                    sub0=sub, n_sub_launch=1, dq_mode=1 if sub == 0 else 2, **common),
                           shared_mem=smem)
                warps = c.n_heads * c.n_q
                launch(SOURCE, merge_name, (math.ceil(warps / (ROW_THREADS // 32)),), (ROW_THREADS,),
                       dq_merge_args(part_dq, topk, dq, seqlen=seqlen, heads=heads, top_k=top_k,
                                     n_blocks=n_blocks, chunk=c))
            else:
                launch(SOURCE, main_name, (n_seg * n_sub,), (BWD_THREADS,),
                       bwd_args(q, k, v, dout, rows, pairs, seg_off, dq_acc, part_dq, dk, dv, dk_acc, dv_acc,
                                sub0=0, n_sub_launch=n_sub, dq_mode=0, **common),
                       shared_mem=smem)
        if not deterministic:
            dq = dq_acc.to(q.dtype)
        if split:
            dk.copy_(dk_acc)
            dv.copy_(dv_acc)
        return dq, dk, dv


# --------------------------------------------------------------------------------------------------
# the custom ops


@torch.library.custom_op("mobalab::moba_attention_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int, top_k: int, causal: bool,
            scale: float, deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if q.is_cuda:
        topk = A._route(q, k, block_size, top_k, causal).to(torch.int32).contiguous()
        out, lse = A.moba_attention_cuda(q, k, v, block_size, top_k, causal=causal, softmax_scale=scale,
                                         return_lse=True, topk_indices=topk)
        return out, lse, topk
    topk = R.moba_topk(q, k, block_size, top_k, causal=causal)
    with torch.no_grad():
        out, lse = R.moba_attention_given_routing(q, k, v, topk, block_size, causal=causal, softmax_scale=scale)
    return out.contiguous(), lse.contiguous(), topk


@_fwd_op.register_fake
def _(q, k, v, block_size, top_k, causal, scale, deterministic):
    batch, seqlen, heads, _ = q.shape
    lse_dtype = C.compute_dtype(q.dtype)
    return (q.new_empty(q.shape), q.new_empty((batch, seqlen, heads), dtype=lse_dtype),
            q.new_empty((batch, seqlen, heads, top_k), dtype=torch.int32))


@torch.library.custom_op("mobalab::moba_attention_bwd", mutates_args=())
def _bwd_op(dout: torch.Tensor, dlse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            out: torch.Tensor, lse: torch.Tensor, topk: torch.Tensor, block_size: int, top_k: int, causal: bool,
            scale: float, deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if q.is_cuda:
        return moba_attention_backward_cuda(dout, q, k, v, out, lse, topk, block_size, top_k, causal, scale,
                                            deterministic=deterministic, dlse=dlse)
    dq, dk, dv = R.moba_attention_backward(dout, q, k, v, out, lse, topk, block_size, causal, scale, dlse=dlse)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@_bwd_op.register_fake
def _(dout, dlse, q, k, v, out, lse, topk, block_size, top_k, causal, scale, deterministic):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, block_size, top_k, causal, scale, deterministic = inputs
    out, lse, topk = output
    ctx.save_for_backward(q, k, v, out, lse, topk)
    ctx.params = (block_size, top_k, causal, scale, deterministic)


def _backward(ctx, dout, dlse, dtopk):
    q, k, v, out, lse, topk = ctx.saved_tensors
    block_size, top_k, causal, scale, deterministic = ctx.params
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = _bwd_op(dout, dlse, q, k, v, out, lse, topk, block_size, top_k, causal, scale, deterministic)
    return dq, dk, dv, None, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------
# the API


def moba_attention_autograd(q, k, v, block_size: int, top_k: int, causal: bool = True, softmax_scale=None,
                            return_lse: bool = False, *, deterministic: bool = False):
    """Differentiable MoBA attention through the ``mobalab::moba_attention_fwd`` custom op.

    CUDA tensors: bf16/fp16, head dim 64/128, every block size and top-k of the CUDA forward; gradients
    dq, dk, dv from the CUDA backward (see the module docstring for ``deterministic``). CPU tensors: the
    torch reference behind the same op (any float dtype). Returns ``out`` and, with ``return_lse``, the
    natural-log ``lse`` (float32; the gradient w.r.t. it is honoured as well).
    """
    if not isinstance(deterministic, bool):
        raise ValueError(f"moba_attention_autograd: deterministic must be True or False, got {deterministic!r}")
    if isinstance(q, torch.Tensor) and q.is_cuda:
        block_size, top_k, scale = A._validate(q, k, v, block_size, top_k, causal, softmax_scale, return_lse, None)
    else:
        fn = "moba_attention_autograd"
        C.check_inputs(fn, q, k, v, path="reference")
        block_size = C.check_block_size(fn, block_size, "reference")
        top_k = C.check_top_k(fn, top_k, "reference")
        C.check_flag(fn, "causal", causal)
        C.check_flag(fn, "return_lse", return_lse)
        scale = C.check_softmax_scale(fn, softmax_scale, q.shape[-1])
    out, lse, _ = _fwd_op(q, k, v, block_size, top_k, causal, scale, deterministic)
    if return_lse:
        return out, lse
    return out
