r"""One step of the ring on one rank: attention of a query segment over a key segment, forward and backward.

The queries hold their routing (global block indices). Over a key segment they attend only the keys of their
selected blocks that the segment holds; the result is a *partial* (out, lse) per query (out 0 and lse
:math:`-\infty` where nothing is held), and the partials of all segments combine by log-sum-exp into
single-device MoBA (:mod:`mobalab.distributed._merge`). The backward uses the combined out and lse, so each
segment's terms are exactly the whole gradient's terms of the keys it holds:

.. math::
    P_{ti} = e^{\sigma q_t\cdot k_i - \mathrm{lse}_t}, \quad D_t = dO_t\cdot O_t - d\mathrm{lse}_t, \quad
    dQ_t \mathrel{+}= \sigma \textstyle\sum_{i \in \mathrm{seg}} P_{ti}(dO_t\cdot v_i - D_t)\, k_i,

and dK, dV of the segment's keys likewise (docs/design.md, "Backward").

Two ways to compute a pair:

* the torch reference with positions (:func:`mobalab.kernels.reference.moba_attention_given_routing` and
  :func:`~mobalab.kernels.reference.moba_attention_backward` with ``query_offset`` / ``key_offset``): any
  segments, any device; the only path on CPU;
* the CUDA kernels, which take queries and keys of one sequence sharing positions, block 0 at key 0. A key
  segment is cut into a *head* (the keys before its first block boundary, < B), a *body* of whole blocks and a
  *tail* (< B keys after the last boundary). The body goes to the kernels with the routing rebased to it
  (``topk - first_block``, -1 outside): with ``causal=True`` when the query segment is the key segment (its
  queries over the body share the body's positions), with ``causal=False`` when the body lies entirely before
  the queries or the attention is not causal (then no key of a selected block is masked, so positions do not
  matter and shorter q or K/V are padded to a common length; padded K/V form blocks nobody selects). Head,
  tail, and the few queries after the body that attend it causally (< B of them) go to the reference. A
  segment that starts at a block boundary and ends at one (or at the end of the sequence) is one kernel call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels import reference as R
from ..kernels._pairs import rebased_topk
from ._device import on_device
from ._merge import GradientSum

__all__ = ["Params", "CudaKernels", "cuda_kernels", "forward_pair", "backward_pair", "Sink", "KeySums"]


@dataclass(frozen=True)
class Params:
    block_size: int
    top_k: int
    causal: bool
    scale: float
    centroid_precision: str = "fp32"  # the routing's centroids (mobalab.kernels.reference.moba_topk)


# ---------------------------------------------------------------------------------------------------
# the CUDA kernels as one-sequence calls


class CudaKernels:
    """The CUDA kernels on one sequence: forward and backward (q, k, v of equal length, routing local to it)
    and the fused top-k (rows at positions query_offset, query_offset + 1, ... of the centroids given)."""

    #: the dtype of the buffers that forward / backward write into in place (``into=``)
    into_dtype = torch.float32
    #: scratch per kernel call. The kernels' default is 4% of the call's q, k, v and out bytes (at least
    #: 640 MiB), sized for a whole sequence; a ring call covers one segment, so the default cut a 512K-row
    #: segment into three chunks per head (48 launches of the tile, the pair lists and the merge per call,
    #: each with its tail), where 1.5 GiB takes it in one chunk per head.
    scratch_bytes = 3 << 29

    def __init__(self, params: Params):
        self.params = params

    def lists(self, q, centroids, block_size, top_k, causal, query_offset=0):
        from ._routing import kernel_lists

        with on_device(q):
            return kernel_lists(q, centroids, block_size, top_k, causal, query_offset,
                                centroid_precision=self.params.centroid_precision)

    def forward(self, q, k, v, topk, causal, into=None, fold=False):
        from ..kernels._cuda_attention import moba_attention_cuda

        p = self.params
        with on_device(q):
            return moba_attention_cuda(q, k, v, p.block_size, p.top_k, causal=causal, softmax_scale=p.scale,
                                       return_lse=True, topk_indices=topk, into=into, fold=fold,
                                       scratch_budget_bytes=self.scratch_bytes)

    def delta(self, out, dout, dlse):
        r"""The rows' :math:`D = dO\cdot O - d\mathrm{lse}` (fp32 (batch, rows, heads)), once for all calls."""
        from ..kernels._cuda_backward import backward_delta

        with on_device(out):
            return backward_delta(out, dout, dlse)

    def backward(self, dout, q, k, v, out, lse, topk, causal, dlse, into=None, kv_fresh=False, delta=None):
        from ..kernels._cuda_backward import moba_attention_backward_cuda

        p = self.params
        with on_device(q):
            return moba_attention_backward_cuda(dout, q, k, v, out, lse, topk, p.block_size, p.top_k, causal,
                                                p.scale, dlse=dlse, into=into, kv_fresh=kv_fresh,
                                                scratch_budget_bytes=self.scratch_bytes, delta=delta)


def cuda_kernels(q: torch.Tensor, params: Params, mode: str):
    """The kernels for these inputs, or None when the reference must do the work.

    ``mode`` "reference" always gives None; "auto" gives the CUDA kernels for CUDA tensors when CuPy is
    usable and the CUDA path supports the dtype, head dim, block size and top-k.
    """
    if mode == "reference" or not q.is_cuda:
        return None
    from ..kernels import _contract as C
    from ..kernels import gpu_available

    if not gpu_available():
        return None
    supported = (q.dtype in C.CUDA_DTYPES and q.shape[-1] in C.CUDA_HEAD_DIMS
                 and params.block_size in C.CUDA_BLOCK_SIZES and params.top_k <= C.MAX_TOP_K)
    return CudaKernels(params) if supported else None


# ---------------------------------------------------------------------------------------------------
# how a pair is cut: a key segment into head, body (whole blocks) and tail, as the block sums cut it

_cut = R._block_cut


def _local_routing(topk: torch.Tensor, key_start: int, n_keys: int, block_size: int) -> torch.Tensor:
    """Routing local to the whole blocks of keys ``key_start .. key_start + n_keys - 1`` (a kernel call's body,
    ``key_start`` on a block boundary); -1 for every other slot."""
    return rebased_topk(topk, key_start // block_size, n_keys // block_size)


def _pad_rows(x: torch.Tensor, n: int, value=0) -> torch.Tensor:
    """``x`` with its dim 1 padded to ``n`` rows of ``value``."""
    if x.shape[1] == n:
        return x
    pad = x.new_full((x.shape[0], n - x.shape[1], *x.shape[2:]), value)
    return torch.cat([x, pad], dim=1)


def _skip(qs: int, n_q: int, ks: int, causal: bool) -> bool:
    """Causal queries never attend keys after the last of them."""
    return causal and ks > qs + n_q - 1


# A plan is a list of calls; each names the query rows, the key range (local to the segments) and how to run.
@dataclass(frozen=True)
class _Call:
    rows: tuple[int, int]
    keys: tuple[int, int]
    kind: str  # "reference", "kernel-causal" (same positions), "kernel-free" (positions do not matter)

    @property
    def padded(self) -> bool:
        """A kernel call whose query rows and keys differ in number: the shorter side is padded to the other."""
        return self.kind == "kernel-free" and self.rows[1] - self.rows[0] != self.keys[1] - self.keys[0]


def _plan(qs: int, n_q: int, ks: int, n_k: int, params: Params, kernels) -> list[_Call]:
    if _skip(qs, n_q, ks, params.causal):
        return []
    everything = (0, n_q)
    if kernels is None:
        return [_Call(everything, (0, n_k), "reference")]
    cut = _cut(ks, n_k, params.block_size)
    calls = [_Call(everything, r, "reference") for r in (cut.head, cut.tail) if r[1] > r[0]]
    b0, b1 = cut.body
    if b1 == b0:
        return calls
    body_start, body_end = ks + b0, ks + b1
    if not params.causal or body_end <= qs:
        calls.append(_Call(everything, cut.body, "kernel-free"))
    elif qs == ks and n_q == n_k:
        # the query segment is the key segment: rows of the body share its positions; rows after it
        # (the tail's queries, < B) see the whole body as the past; rows before it see only the future
        calls.append(_Call(cut.body, cut.body, "kernel-causal"))
        if cut.tail[1] > cut.tail[0]:
            calls.append(_Call(cut.tail, cut.body, "reference"))
    elif body_start > qs + n_q - 1:
        pass  # the body is in the future of every query
    else:  # overlapping segments that are not the same (no layout makes them): the reference does it
        calls.append(_Call(everything, cut.body, "reference"))
    return calls


# ---------------------------------------------------------------------------------------------------
# forward


def forward_pair(q, k, v, topk, qs: int, ks: int, params: Params, kernels=None, acc=None, row0: int = 0):
    """Partial attention of queries at positions ``qs ..`` over keys at ``ks ..``.

    ``q`` (batch, n_q, heads, d) with routing ``topk`` (batch, n_q, heads, top_k) of global blocks; ``k``, ``v``
    (batch, n_k, kv_heads, d). Returns a list of (row_lo, row_hi, out, lse): partials of query rows
    ``row_lo .. row_hi - 1`` (out in q's dtype, lse in the compute dtype), to be combined by log-sum-exp.
    With ``acc`` (an :class:`~mobalab.distributed._merge.Accumulator` whose rows ``row0 ..`` are these queries)
    the partials are folded into it instead and nothing is returned: a kernel call whose rows are dense there
    (batch 1, no padding, the kernels' ``into_dtype``) merges straight into it, without its output in q's dtype
    and the fold's passes.
    """
    pieces = []
    for call in _plan(qs, q.shape[1], ks, k.shape[1], params, kernels):
        (r0, r1), (k0, k1) = call.rows, call.keys
        qr, kr, vr, tr = q[:, r0:r1], k[:, k0:k1], v[:, k0:k1], topk[:, r0:r1]
        if call.kind == "reference":
            out, lse = R.moba_attention_given_routing(qr, kr, vr, tr, params.block_size, params.causal,
                                                      params.scale, query_offset=qs + r0, key_offset=ks + k0)
        else:
            local = _local_routing(tr, ks + k0, k1 - k0, params.block_size)
            if (acc is not None and not call.padded and acc.out.dtype == kernels.into_dtype
                    and acc.dense(row0 + r0, row0 + r1)):
                acc_out, acc_lse, fold = acc.target(row0 + r0, row0 + r1)
                kernels.forward(qr, kr, vr, local, call.kind == "kernel-causal", into=(acc_out, acc_lse),
                                fold=fold)
                continue
            if call.kind == "kernel-causal":
                out, lse = kernels.forward(qr, kr, vr, local, True)
            else:
                n = max(r1 - r0, k1 - k0)
                out, lse = kernels.forward(_pad_rows(qr, n), _pad_rows(kr, n), _pad_rows(vr, n),
                                           _pad_rows(local, n, -1), False)
                out, lse = out[:, :r1 - r0], lse[:, :r1 - r0]
        if acc is not None:
            acc.add(row0 + r0, row0 + r1, out, lse)
        else:
            pieces.append((r0, r1, out, lse))
    return None if acc is not None else pieces


# ---------------------------------------------------------------------------------------------------
# backward


class KeySums:
    """The compute-dtype sums of dK and dV of one key shard, made at the first term (None: nothing attended it)."""

    def __init__(self, shape, dtype, device):
        self._args = (shape, dtype, device)
        self.dk: GradientSum | None = None
        self.dv: GradientSum | None = None

    def ensure(self) -> tuple[GradientSum, GradientSum]:
        if self.dk is None:
            self.dk, self.dv = GradientSum(*self._args), GradientSum(*self._args)
        return self.dk, self.dv

    def result(self):
        """(dk, dv) sums, or (None, None) when no term arrived."""
        return (None, None) if self.dk is None else (self.dk.result(), self.dv.result())


@dataclass(frozen=True)
class Sink:
    """Where a pair's gradient terms go: ``dq`` rows from ``q0`` on (the query segment's place in the shard's dQ
    sum), ``kv`` rows from ``k0`` on."""

    dq: GradientSum
    q0: int
    kv: KeySums
    k0: int

    def add(self, r0, r1, k0, k1, dq, dk, dv) -> None:
        self.dq.add(self.q0 + r0, self.q0 + r1, dq)
        sum_k, sum_v = self.kv.ensure()
        sum_k.add(self.k0 + k0, self.k0 + k1, dk)
        sum_v.add(self.k0 + k0, self.k0 + k1, dv)

    def targets(self, r0, r1, k0, k1, dtype):
        """(dq, dk, dv views, kv_fresh) for a kernel to write rows [r0, r1) and keys [k0, k1) in place, or None
        when the rows are not dense in the sums (batch > 1) or the sums are not of the kernels' ``dtype``."""
        sum_k, sum_v = self.kv.ensure()
        qa, qb, ka, kb = self.q0 + r0, self.q0 + r1, self.k0 + k0, self.k0 + k1
        if self.dq.value.dtype != dtype or not (
                self.dq.dense(qa, qb) and sum_k.dense(ka, kb) and sum_v.dense(ka, kb)):
            return None
        dq, _ = self.dq.target(qa, qb, store_ok=False)  # dQ arrives by atomic adds
        dk, fresh = sum_k.target(ka, kb, store_ok=True)
        dv, _ = sum_v.target(ka, kb, store_ok=True)  # same rows written as dk's so far: same freshness
        return dq, dk, dv, fresh


def backward_pair(dout, q, k, v, out, lse, topk, dlse, qs: int, ks: int, params: Params, kernels=None,
                  sink: Sink | None = None, delta=None):
    """This pair's terms of the gradients, given the combined ``out`` and ``lse`` of the query rows.

    Returns (dq pieces [(row_lo, row_hi, dq)], dkv pieces [(key_lo, key_hi, dk, dv)]) in the input dtypes;
    ``dlse`` is the gradient w.r.t. the combined lse or None. With a ``sink`` the terms are added into its sums
    instead and nothing is returned: a kernel call whose rows are dense there (batch 1, no padding) writes its
    fp32 terms in place, without the conversions to the input dtype and back. ``delta``: the query rows'
    :math:`D` from ``kernels.delta`` (computed once per query segment, not once per kernel call), or None.
    """
    dq_pieces, dkv_pieces = [], []
    for call in _plan(qs, q.shape[1], ks, k.shape[1], params, kernels):
        (r0, r1), (k0, k1) = call.rows, call.keys
        rows = slice(r0, r1)
        qr, kr, vr, tr = q[:, rows], k[:, k0:k1], v[:, k0:k1], topk[:, rows]
        gr, orow, lrow = dout[:, rows], out[:, rows], lse[:, rows]
        drow = None if dlse is None else dlse[:, rows]
        dlt = None if delta is None else delta[:, rows]
        if call.kind == "reference":
            dq, dk, dv = R.moba_attention_backward(gr, qr, kr, vr, orow, lrow, tr, params.block_size, params.causal,
                                                   params.scale, drow, query_offset=qs + r0, key_offset=ks + k0)
        else:
            local = _local_routing(tr, ks + k0, k1 - k0, params.block_size)
            into = None if sink is None or call.padded else sink.targets(r0, r1, k0, k1, kernels.into_dtype)
            if into is not None:
                kernels.backward(gr, qr, kr, vr, orow, lrow, local, call.kind == "kernel-causal", drow,
                                 into=into[:3], kv_fresh=into[3], delta=dlt)
                continue
            if call.kind == "kernel-causal":
                dq, dk, dv = kernels.backward(gr, qr, kr, vr, orow, lrow, local, True, drow, delta=dlt)
            else:
                n = max(r1 - r0, k1 - k0)
                padded = [_pad_rows(x, n) for x in (gr, qr, kr, vr, orow, lrow)]
                dq, dk, dv = kernels.backward(*padded, _pad_rows(local, n, -1), False,
                                              None if drow is None else _pad_rows(drow, n),
                                              delta=None if dlt is None else _pad_rows(dlt, n))
                dq, dk, dv = dq[:, :r1 - r0], dk[:, :k1 - k0], dv[:, :k1 - k0]
        if sink is not None:
            sink.add(r0, r1, k0, k1, dq, dk, dv)
        else:
            dq_pieces.append((r0, r1, dq))
            dkv_pieces.append((k0, k1, dk, dv))
    return None if sink is not None else (dq_pieces, dkv_pieces)
