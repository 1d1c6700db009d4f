r"""Ring attention for MoBA: K/V shards pass around the ring, gradients of K/V travel with them in backward.

Forward, on rank r of R, after routing (:mod:`._routing`): K and V of the shard make R - 1 hops around the
ring. At step s the rank holds the shard of rank (r - s) mod R; it posts the sends of K and V to r + 1 and
the receives of the next shard's from r - 1 (two shards in flight: the one in hand, the one arriving),
computes the partial attention of its queries over the shard in hand (:mod:`._local`) and folds it into its
running (out, lse) by log-sum-exp (:mod:`._merge`), then waits. Communication of step s overlaps the computation of
step s; on CUDA the wait only orders the compute stream after NCCL's.

Backward: K and V make the same R - 1 hops, and the gradient of a shard (dK, dV, sent in the input dtype)
follows one step behind: at step s rank r adds its terms for shard c = (r - s) mod R to the
accumulated gradient of c that arrives from r - 1 during the step, and sends the sum on at step s + 1. At the
last step each shard's complete dK, dV go home key segment by key segment, each as soon as it is done, so only
the last segment's hop is not overlapped with work (batch 1; otherwise one more hop after the step). So every
step moves K/V one hop and dK/dV one hop, both overlapped with the step's compute, and dQ never leaves its
rank. (Moving queries instead of keys would move q, dO, lse, D and dQ: more bytes whenever heads > kv_heads;
see docs/design.md, "Context parallelism".)

A long shard runs the ring once per group of heads (:func:`head_groups`): heads never interact, and the ring's
buffers then scale with the group instead of all heads (docs/design.md, "Context parallelism").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels import _contract as C
from ..kernels.autograd import _first_order as first_order
from ._group import Ring, exchange
from ._layout import Layout
from ._local import KeySums, Params, Sink, backward_pair, cuda_kernels, forward_pair
from ._merge import Accumulator, GradientSum
from ._routing import route

__all__ = ["Plan", "RingMoBA", "ring_forward", "ring_backward", "head_groups", "forward_head_groups",
           "backward_head_groups", "ring_bytes_per_token", "forward_bytes_per_token", "RING_BUDGET_BYTES",
           "FORWARD_MEMORY_SHARE", "BACKWARD_MEMORY_SHARE"]


@dataclass(frozen=True)
class Plan:
    """Everything a rank needs to take part: the layout, its place in the ring, the MoBA parameters."""

    layout: Layout
    ring: Ring
    params: Params
    kernels: str  # "auto" or "reference"


def _empty_shard(like: torch.Tensor, length: int) -> torch.Tensor:
    return like.new_empty((like.shape[0], length, *like.shape[2:]))


def _home_shards(k: torch.Tensor, v: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty (dK, dV) shards of this rank's ``length`` tokens: where its own shard's gradients arrive."""
    return _empty_shard(k, length), _empty_shard(v, length)


def _attend_shard(q, k_held, v_held, topk, source: int, plan: Plan, kernels, acc: Accumulator) -> None:
    """Fold the partial attention of this rank's queries over the shard of rank ``source`` into ``acc``."""
    for qseg in plan.layout.segments(plan.ring.rank):
        rows = slice(qseg.local, qseg.local + qseg.length)
        for kseg in plan.layout.segments(source):
            keys = slice(kseg.local, kseg.local + kseg.length)
            forward_pair(q[:, rows], k_held[:, keys], v_held[:, keys], topk[:, rows], qseg.start, kseg.start,
                         plan.params, kernels, acc=acc, row0=qseg.local)


def ring_forward(q, k, v, topk, plan: Plan, cast: bool = True):
    """(out in q's dtype, lse in the compute dtype) of this rank's queries over the whole sequence; out in the
    compute dtype without ``cast`` (for a caller that converts it as it copies it into place)."""
    ring, layout = plan.ring, plan.layout
    kernels = cuda_kernels(q, plan.params, plan.kernels)
    acc = Accumulator(q.shape, C.compute_dtype(q.dtype), q.device)
    held = (k.contiguous(), v.contiguous())  # P2P sends whole, dense buffers
    for step in range(ring.world):
        source = (ring.rank - step) % ring.world
        requests, incoming = [], None
        if step < ring.world - 1:
            length = layout.lengths[(source - 1) % ring.world]
            incoming = (_empty_shard(k, length), _empty_shard(v, length))
            requests = exchange(ring, list(held), list(incoming))
        _attend_shard(q, *held, topk, source, plan, kernels, acc)
        for request in requests:
            request.wait()
        if incoming is not None:
            held = incoming
    out, lse = acc.result()
    return (out.to(q.dtype) if cast else out), lse


def _pair_terms(dout, dlse, q, k_held, v_held, out, lse, topk, qseg, kseg, plan: Plan, kernels, dq, kv, delta):
    """The gradient terms of query segment ``qseg`` (this rank's) over key segment ``kseg`` (of the shard held):
    dQ into ``dq`` (a :class:`GradientSum`), dK / dV into ``kv`` (a :class:`KeySums`)."""
    rows = slice(qseg.local, qseg.local + qseg.length)
    keys = slice(kseg.local, kseg.local + kseg.length)
    backward_pair(dout[:, rows], q[:, rows], k_held[:, keys], v_held[:, keys], out[:, rows], lse[:, rows],
                  topk[:, rows], None if dlse is None else dlse[:, rows], qseg.start, kseg.start, plan.params,
                  kernels, sink=Sink(dq, qseg.local, kv, kseg.local), delta=None if delta is None else delta[:, rows])


def _shard_gradients(dout, dlse, q, k_held, v_held, out, lse, topk, source: int, plan: Plan, kernels, dq, delta):
    """This rank's terms of dK, dV of the shard of rank ``source`` (compute dtype; None if it attends none of
    it); its dQ terms are added to ``dq`` (a :class:`GradientSum`)."""
    kv = KeySums(k_held.shape, dq.value.dtype, k_held.device)
    for qseg in plan.layout.segments(plan.ring.rank):
        for kseg in plan.layout.segments(source):
            _pair_terms(dout, dlse, q, k_held, v_held, out, lse, topk, qseg, kseg, plan, kernels, dq, kv, delta)
    return kv.result()


class HomeHop:
    """The last hop of a backward pass in flight: each shard's complete dK, dV on their way home.

    :meth:`result` orders the caller's stream after the transfer (on CUDA it does not block the host), so a
    caller with more passes to run first queues the next pass's work, then asks: the hop then overlaps that
    work instead of standing alone between passes.
    """

    def __init__(self, requests, grads, sent=()):
        self._requests, self._grads = requests, grads
        self._sent = sent  # the sent buffers stay alive until the transfer is waited for

    def result(self):
        for request in self._requests:
            request.wait()
        self._requests, self._sent = [], ()
        return self._grads


def _streams_home(plan: Plan, k) -> bool:
    """Whether the last step can send each key segment's complete dK/dV as soon as it is done: several ranks,
    batch 1 (a segment's rows are one dense block) and the same number of segments on every rank (a rank's
    k-th segment send then meets its peer's k-th receive)."""
    counts = {len(plan.layout.segments(r)) for r in range(plan.ring.world)}
    return plan.ring.world > 1 and k.shape[0] == 1 and len(counts) == 1


def _last_step_streamed(dout, dlse, q, k_held, v_held, out, lse, topk, source: int, plan: Plan, kernels, dq,
                        delta, requests, arriving, home) -> HomeHop:
    """The last ring step, key segment by key segment of shard ``source``: this rank's terms for the segment,
    then the segment's complete dK/dV (the arriving sum plus these terms, rounded once) leave for home at once,
    so each segment's hop overlaps the next segment's work and only the last one's stands alone."""
    ring, layout = plan.ring, plan.layout
    kv = KeySums(k_held.shape, dq.value.dtype, k_held.device)
    hops, sent = [], []
    for i, (kseg, mine) in enumerate(zip(layout.segments(source), layout.segments(ring.rank), strict=True)):
        keys = slice(kseg.local, kseg.local + kseg.length)
        for qseg in layout.segments(ring.rank):
            _pair_terms(dout, dlse, q, k_held, v_held, out, lse, topk, qseg, kseg, plan, kernels, dq, kv, delta)
        if i == 0:
            for request in requests:
                request.wait()
        done_k, done_v = arriving[0][:, keys], arriving[1][:, keys]
        if kv.dk is not None:  # in place, rounded once (see ring_backward); rows without terms are left alone
            kv.dk.add_to(done_k, keys.start, keys.stop)
            kv.dv.add_to(done_v, keys.start, keys.stop)
        at = slice(mine.local, mine.local + mine.length)
        hops += exchange(ring, [done_k, done_v], [home[0][:, at], home[1][:, at]])
        sent.append((done_k, done_v))
    return HomeHop(hops, home, sent=(arriving, sent))


def ring_backward(dout, dlse, q, k, v, out, lse, topk, plan: Plan, defer_home: bool = False):
    """(dq, dk, dv) of this rank's shard, in the input dtypes; with ``defer_home`` (dq in the compute dtype,
    :class:`HomeHop`), for a caller that converts dq as it copies it into place.

    The travelling dK, dV are sums of the terms of the ranks they have visited, added to in the compute dtype
    and sent in the input dtype: half the bytes of fp32 for bf16, at the price of rounding the partial sum at
    each of the R - 1 hops where single-device MoBA rounds once.
    """
    ring, layout = plan.ring, plan.layout
    kernels = cuda_kernels(q, plan.params, plan.kernels)
    dq = GradientSum(q.shape, C.compute_dtype(q.dtype), q.device)
    # D = dO.O - dlse of every row, once: the rank makes several kernel calls over each query segment
    delta = None if kernels is None else kernels.delta(out, dout, dlse)
    # finished: the gradient of the shard handled at the last step, summed over the ranks it has visited
    held, finished, hop = (k.contiguous(), v.contiguous()), None, None
    for step in range(ring.world):
        source = (ring.rank - step) % ring.world
        sends, recvs, incoming, arriving = [], [], None, None
        if step < ring.world - 1:
            length = layout.lengths[(source - 1) % ring.world]
            incoming = (_empty_shard(k, length), _empty_shard(v, length))
            sends += held
            recvs += incoming
        if step > 0:
            length = layout.lengths[source]
            arriving = (_empty_shard(k, length), _empty_shard(v, length))
            sends += finished
            recvs += arriving
        requests = exchange(ring, sends, recvs)
        if step == ring.world - 1 and _streams_home(plan, k):
            home = _home_shards(k, v, layout.lengths[ring.rank])
            hop = _last_step_streamed(dout, dlse, q, *held, out, lse, topk, source, plan, kernels, dq, delta,
                                      requests, arriving, home)
            break
        grad_k, grad_v = _shard_gradients(dout, dlse, q, *held, out, lse, topk, source, plan, kernels, dq, delta)
        for request in requests:
            request.wait()
        if grad_k is None:
            finished = arriving if arriving is not None else (torch.zeros_like(held[0]), torch.zeros_like(held[1]))
        elif arriving is not None:
            # in place, one pass: the input-dtype sum computed in the compute dtype and rounded once
            # (as (grad + arriving).to(dtype) would, without its two passes over the fp32 sum)
            arriving[0].add_(grad_k)
            arriving[1].add_(grad_v)
            finished = arriving
        else:
            finished = (grad_k.to(k.dtype), grad_v.to(v.dtype))
        del grad_k, grad_v, arriving
        if incoming is not None:
            held = incoming
    if hop is None:  # one rank, or the last step not streamed: each shard's complete gradient goes home now
        if ring.world > 1:
            home = _home_shards(k, v, layout.lengths[ring.rank])
            hop = HomeHop(exchange(ring, list(finished), list(home)), home, sent=finished)
        else:
            hop = HomeHop([], finished)
    dq = dq.result() if defer_home else dq.result().to(q.dtype)
    if defer_home:
        return dq, hop
    return (dq, *hop.result())


# Bytes a ring pass keeps alive per shard token and per query head (with its share of kv heads), beyond the
# caller's tensors: the backward's (the larger) -- q, k, v, out, dO slices of the head group, fp32 dQ, K/V in
# hand and arriving, dK/dV arriving and leaving, the shard's fp32 dK/dV, and the CUDA backward's own fp32 dQ,
# dK, dV scratch and its returned pieces; counted in elements of the input dtype (e) and fp32 (4).
def ring_bytes_per_token(heads: int, kv_heads: int, head_dim: int, elem: int, sliced: bool = True,
                         kernel_scratch: bool = True) -> float:
    """Peak bytes per shard token of one ring pass over all ``heads`` (see :func:`head_groups`); without the
    slices (one pass over every head reads the caller's tensors as they are) or without the kernels' own
    gradient scratch (batch 1: they write into the ring's fp32 sums in place)."""
    hd, gd = heads * head_dim, kv_heads * head_dim
    slices = elem * (3 * hd + 2 * gd) if sliced else 0
    ring = 4 * hd + 3 * elem * 2 * gd + 4 * 2 * gd
    kernel = 4 * hd + elem * hd + elem * 2 * gd + 4 * 2 * gd if kernel_scratch else 0
    return float(slices + ring + kernel)


# The forward alone holds far less: slices of q, k, v (when the heads are split), the fp32 running output and
# lse, K/V in hand and arriving, the pass's output in q's dtype.
def forward_bytes_per_token(heads: int, kv_heads: int, head_dim: int, elem: int, sliced: bool = True) -> float:
    """Peak bytes per shard token of one forward ring pass over all ``heads``; without the slices of q, k, v
    when ``sliced`` is False (one pass over every head reads the caller's tensors as they are)."""
    hd, gd = heads * head_dim, kv_heads * head_dim
    slices = elem * (hd + 2 * gd) if sliced else 0
    return float(slices + 4 * hd + 4 * heads + 2 * elem * 2 * gd + elem * hd)


#: Working set one ring pass may hold; beyond it the heads are taken in groups (whole kv groups), one pass each.
RING_BUDGET_BYTES = 8 << 30
#: Share of a GPU's memory the forward's passes may hold: its working set is a fraction of the backward's, which
#: sets the peak, and every pass beyond one copies its heads' slices of q, k, v out and its output back in.
FORWARD_MEMORY_SHARE = 0.25
#: Share of a GPU's memory one backward pass over all heads may hold (batch 1, kernels writing in place): then
#: no slices of dO, q, k, v, out are copied out nor gradients copied back; else passes within the fixed budget.
BACKWARD_MEMORY_SHARE = 0.4


def forward_head_groups(batch: int, shard: int, heads: int, kv_heads: int, head_dim: int, elem: int,
                        budget: float | None = None) -> list[tuple[int, int]]:
    """The forward's passes: one over all heads when its working set (no slices then) fits ``budget``, else
    :func:`head_groups` by the forward's bytes per token."""
    budget = RING_BUDGET_BYTES if budget is None else budget
    if batch * shard * forward_bytes_per_token(heads, kv_heads, head_dim, elem, sliced=False) <= budget:
        return [(0, heads)]
    return head_groups(batch, shard, heads, kv_heads, head_dim, elem, budget, per_token=forward_bytes_per_token)


def backward_head_groups(batch: int, shard: int, heads: int, kv_heads: int, head_dim: int, elem: int,
                         device_bytes: float | None = None) -> list[tuple[int, int]]:
    """The backward's passes: one over all heads on a GPU of ``device_bytes`` when batch is 1 (the kernels
    write into the ring's sums) and that pass's working set fits :data:`BACKWARD_MEMORY_SHARE` of it, else
    :func:`head_groups` (within :data:`RING_BUDGET_BYTES`)."""
    whole = batch * shard * ring_bytes_per_token(heads, kv_heads, head_dim, elem, sliced=False,
                                                 kernel_scratch=False)
    if device_bytes is not None and batch == 1 and whole <= BACKWARD_MEMORY_SHARE * device_bytes:
        return [(0, heads)]
    return head_groups(batch, shard, heads, kv_heads, head_dim, elem)


def head_groups(batch: int, shard: int, heads: int, kv_heads: int, head_dim: int, elem: int,
                budget: float | None = None, per_token=None) -> list[tuple[int, int]]:
    """Query-head ranges [h0, h1) of the ring passes: the fewest passes (whole kv groups, dividing the kv heads)
    whose working set fits ``budget`` (default :data:`RING_BUDGET_BYTES`), else one pass per kv head.
    ``per_token``: bytes per shard token of a pass over all heads (default :func:`ring_bytes_per_token`).

    Heads never interact in MoBA, so passes over head groups give the same result as one pass; the ring's
    buffers (K/V in flight, travelling gradients, fp32 accumulators, the kernels' scratch) then scale with the
    group, not with all heads: a long shard's memory stays near the caller's own tensors.
    """
    budget = RING_BUDGET_BYTES if budget is None else budget
    group = heads // kv_heads
    per_token = ring_bytes_per_token if per_token is None else per_token
    per_kv_head = batch * shard * per_token(heads, kv_heads, head_dim, elem) / kv_heads
    passes = next((n for n in range(1, kv_heads + 1) if kv_heads % n == 0
                   and per_kv_head * (kv_heads // n) <= budget), kv_heads)
    width = kv_heads // passes * group
    return [(h, h + width) for h in range(0, heads, width)]


def _heads(x, h0: int, h1: int, group: int = 1):
    """Heads [h0, h1) of x (kv heads when ``group`` > 1: [h0 / group, h1 / group)), dense; x itself if all."""
    if x is None:
        return None
    lo, hi = h0 // group, h1 // group
    if lo == 0 and hi == x.shape[2]:
        return x
    return x[:, :, lo:hi].contiguous()


class RingMoBA(torch.autograd.Function):
    """Routing, then ring attention per head group; backward by :func:`ring_backward` (gradients w.r.t. q, k,
    v only)."""

    @staticmethod
    def forward(ctx, q, k, v, plan: Plan):
        p = plan.params
        kernels = cuda_kernels(q, p, plan.kernels)
        topk = route(q, k, plan.layout, plan.ring, p.block_size, p.top_k, p.causal,
                     lists=None if kernels is None else kernels.lists, centroid_precision=p.centroid_precision)
        group = q.shape[2] // k.shape[2]
        ranges = _passes(q, k, plan, forward=True)
        if len(ranges) == 1:
            out, lse = ring_forward(q, k, v, topk, plan)
        else:
            out = torch.empty_like(q)
            lse = torch.empty(q.shape[:3], dtype=C.compute_dtype(q.dtype), device=q.device)
            for h0, h1 in ranges:
                o, l_ = ring_forward(_heads(q, h0, h1), _heads(k, h0, h1, group), _heads(v, h0, h1, group),
                                     _heads(topk, h0, h1), plan, cast=False)
                out[:, :, h0:h1] = o
                lse[:, :, h0:h1] = l_
                del o, l_
        ctx.save_for_backward(q, k, v, out, lse, topk)
        ctx.plan = plan
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        recorded = torch.is_grad_enabled()  # create_graph: autograd would record the ring's work
        with torch.no_grad():
            grads = RingMoBA._gradients(ctx, dout, dlse)
        if recorded:  # the ring's P2P work has no backward: a second derivative must raise, not drop MoBA's terms
            grads = first_order("context_parallel_moba_attention", grads, dout, dlse, *ctx.saved_tensors[:3])
        return *grads, None

    @staticmethod
    def _gradients(ctx, dout, dlse):
        q, k, v, out, lse, topk = ctx.saved_tensors
        plan = ctx.plan
        if dout is None:
            dout = torch.zeros_like(out)
        ranges = _passes(q, k, plan)
        if len(ranges) == 1:
            return ring_backward(dout, dlse, q, k, v, out, lse, topk, plan)
        group = q.shape[2] // k.shape[2]
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        pending = None  # the previous pass's last hop, completed once this pass's work is queued

        def land(h0, h1, hop):
            g_k, g_v = hop.result()
            dk[:, :, h0 // group:h1 // group] = g_k
            dv[:, :, h0 // group:h1 // group] = g_v

        for h0, h1 in ranges:
            g_q, hop = ring_backward(_heads(dout, h0, h1), _heads(dlse, h0, h1), _heads(q, h0, h1),
                                     _heads(k, h0, h1, group), _heads(v, h0, h1, group), _heads(out, h0, h1),
                                     _heads(lse, h0, h1), _heads(topk, h0, h1), plan, defer_home=True)
            dq[:, :, h0:h1] = g_q
            del g_q
            if pending is not None:
                land(*pending)
            pending = (h0, h1, hop)
        land(*pending)
        return dq, dk, dv


def _passes(q, k, plan: Plan, forward: bool = False) -> list[tuple[int, int]]:
    """The head groups of the ring passes (backward, or ``forward``); every rank computes the same (from the
    longest shard and, on GPUs, the device's memory: every rank of a ring runs on the same kind of GPU)."""
    batch, _, heads, dim = q.shape
    shard, kv_heads, elem = max(plan.layout.lengths), k.shape[2], q.element_size()
    device_bytes = torch.cuda.get_device_properties(q.device).total_memory if q.is_cuda else None
    if not forward:
        return backward_head_groups(batch, shard, heads, kv_heads, dim, elem, device_bytes)
    budget = RING_BUDGET_BYTES
    if device_bytes is not None:
        budget = max(budget, FORWARD_MEMORY_SHARE * device_bytes)
    return forward_head_groups(batch, shard, heads, kv_heads, dim, elem, budget)
