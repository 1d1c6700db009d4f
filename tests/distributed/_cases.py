"""What each rank of a test world runs: context-parallel MoBA against single-process MoBA on the whole sequence.

Every rank draws the whole sequence from the case's seed (so all ranks and the single-process result see the
same numbers), runs :func:`mobalab.distributed.context_parallel_moba_attention` on its shard, and reports the
largest differences from single-process :func:`mobalab.kernels.reference.moba_attention` on its rows (output,
lse, dq, dk, dv) and whether its routing equals single-process routing. float64 throughout, so any difference
above rounding is a bug.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from mobalab.distributed import context_parallel_moba_attention, shard_positions
from mobalab.distributed._group import ring_of
from mobalab.distributed._layout import Layout
from mobalab.distributed._routing import reference_lists, route
from mobalab.kernels import reference as R


@dataclass(frozen=True)
class Case:
    lengths: tuple
    block_size: int
    top_k: int
    causal: bool = True
    layout: str = "contiguous"
    batch: int = 1
    heads: int = 2
    kv_heads: int = 2
    head_dim: int = 8
    softmax_scale: float | None = None
    with_lse: bool = False  # also return lse and backpropagate a gradient through it
    emulated_kernels: bool = False  # run the CUDA-kernel decomposition, the kernels' work done by the reference
    seed: int = 0
    extra: dict = field(default_factory=dict)


CASES = {
    # two ranks
    "cut-block-causal": Case((20, 20), 8, 3),
    "unequal-gqa-noncausal": Case((13, 29), 8, 2, causal=False, heads=4, kv_heads=2),
    "topk-covers-all-blocks": Case((10, 7), 4, 8),
    "topk-covers-all-noncausal": Case((6, 9), 4, 5, causal=False),
    "zigzag-causal-gqa": Case((17, 23), 8, 3, layout="zigzag", heads=4, kv_heads=1),
    "zigzag-noncausal-lse": Case((15, 16), 4, 3, causal=False, layout="zigzag", with_lse=True),
    "batch-scale-lse": Case((19, 26), 4, 4, batch=2, softmax_scale=0.3, with_lse=True),
    "kernels-aligned-causal": Case((24, 40), 8, 3, emulated_kernels=True),
    "kernels-cut-causal": Case((21, 43), 8, 3, emulated_kernels=True, heads=4, kv_heads=2),
    "kernels-padding-noncausal": Case((9, 40), 8, 3, causal=False, emulated_kernels=True),
    "kernels-zigzag-causal-lse": Case((23, 18), 4, 3, layout="zigzag", emulated_kernels=True, with_lse=True),
    # a ring budget of one byte: one ring pass per kv head (GQA: two query heads each), gradients scattered back
    "head-passes-gqa-lse": Case((21, 19), 4, 3, heads=4, kv_heads=2, with_lse=True, extra={"ring_budget": 1}),
    "head-passes-kernels-zigzag": Case((18, 22), 4, 3, layout="zigzag", heads=4, kv_heads=4,
                                       emulated_kernels=True, batch=2, extra={"ring_budget": 1}),
    # three ranks
    "tiny-shards-causal": Case((3, 2, 30), 8, 3),
    "three-noncausal-gqa": Case((11, 16, 9), 4, 6, causal=False, heads=4, kv_heads=2),
    "three-zigzag-causal": Case((10, 14, 12), 4, 3, layout="zigzag"),
    "three-kernels-causal": Case((16, 17, 15), 4, 3, emulated_kernels=True, batch=2),
    "three-kernels-tiny-noncausal": Case((2, 13, 5), 4, 2, causal=False, emulated_kernels=True),
    # four ranks: dK/dV travel three hops; zigzag cuts the sequence into eight pieces
    "four-zigzag-kernels-lse": Case((9, 12, 10, 11), 4, 3, layout="zigzag", emulated_kernels=True, with_lse=True),
    "four-cut-gqa-noncausal": Case((7, 13, 3, 10), 4, 3, causal=False, heads=4, kv_heads=2),
}


class ReferenceAsKernels:
    """The CUDA kernels' contract (one sequence: q and k of equal length, routing local to it), run by the
    reference in whole-sequence mode, which rejects any call that breaks the contract."""

    def __init__(self, params, into_dtype=torch.float64):
        self.params = params
        self.into_dtype = into_dtype  # what the in-place buffers hold (the CUDA kernels: fp32)
        self.calls = 0
        self.in_place = 0  # forward / backward calls that wrote into the caller's buffers
        self.deltas = 0  # delta calls (once per backward pass, not per kernel call)

    def lists(self, q, centroids, block_size, top_k, causal, query_offset=0):
        return reference_lists(q, centroids, block_size, top_k, causal, query_offset)

    def forward(self, q, k, v, topk, causal, into=None, fold=False):
        """With ``into`` as the merge kernel's fp32 modes do it: stored, or folded in by log-sum-exp."""
        p = self.params
        self.calls += 1
        assert q.shape[1] == k.shape[1], "the kernels take q and k of one length"
        out, lse = R.moba_attention_given_routing(q, k, v, topk, p.block_size, causal, p.scale)
        if into is None:
            return out, lse
        assert all(t.dtype == self.into_dtype and t.is_contiguous() for t in into)
        self.in_place += 1
        acc_out, acc_lse = into
        if not fold:
            acc_out.copy_(out)
            acc_lse.copy_(lse)
            return into
        top = torch.maximum(acc_lse, lse.to(acc_lse.dtype))
        safe = torch.where(top == -math.inf, 0.0, top)
        a, b = torch.exp(acc_lse - safe), torch.exp(lse - safe)
        w_old = torch.where(top == -math.inf, 0.0, a / (a + b))
        w_new = torch.where(top == -math.inf, 0.0, b / (a + b))
        acc_out.mul_(w_old.unsqueeze(-1)).add_(w_new.unsqueeze(-1) * out)
        acc_lse.copy_(torch.where(top == -math.inf, -math.inf, safe + torch.log(a + b)))
        return into

    def delta(self, out, dout, dlse):
        self.deltas += 1
        d = (dout * out).sum(-1)
        return d if dlse is None else d - dlse

    def backward(self, dout, q, k, v, out, lse, topk, causal, dlse, into=None, kv_fresh=False, delta=None):
        """With ``into`` as the CUDA wrapper does it: dQ added, dK / dV stored when ``kv_fresh``, else added.
        With ``delta`` (D = dO.O - dlse of the rows) as the kernel does it: ``out`` and ``dlse`` are not read
        (the reference gets the dlse that gives this D, so D from the wrong rows gives wrong gradients)."""
        p = self.params
        assert q.shape[1] == k.shape[1], "the kernels take q and k of one length"
        if delta is not None:
            dlse = (dout * out).sum(-1) - delta
        grads = R.moba_attention_backward(dout, q, k, v, out, lse, topk, p.block_size, causal, p.scale, dlse)
        if into is None:
            return grads
        assert all(t.dtype == self.into_dtype and t.is_contiguous() for t in into)
        self.in_place += 1
        into[0].add_(grads[0])
        for buf, g in zip(into[1:], grads[1:], strict=True):
            buf.copy_(g) if kv_fresh else buf.add_(g)
        return into


def _whole(case: Case):
    g = torch.Generator().manual_seed(case.seed)
    n = sum(case.lengths)
    shape_q = (case.batch, n, case.heads, case.head_dim)
    shape_kv = (case.batch, n, case.kv_heads, case.head_dim)
    q, k, v = (torch.randn(s, generator=g, dtype=torch.float64) for s in (shape_q, shape_kv, shape_kv))
    dout = torch.randn(shape_q, generator=g, dtype=torch.float64)
    dlse = torch.randn(shape_q[:3], generator=g, dtype=torch.float64)
    return q, k, v, dout, dlse


def _run_case(rank: int, world: int, case: Case, group=None) -> dict:
    from mobalab.distributed import _ring

    q, k, v, dout, dlse = _whole(case)
    # single process, whole sequence
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = R.moba_attention(*leaves, case.block_size, case.top_k, case.causal, case.softmax_scale,
                                return_lse=True)
    loss = (out * dout).sum() + ((lse * dlse).sum() if case.with_lse else 0.0)
    grads = torch.autograd.grad(loss, leaves)
    topk = R.moba_topk(q, k, case.block_size, case.top_k, case.causal)

    # this rank's shard
    pos = shard_positions(case.lengths, rank, case.layout)
    shard = [x[:, pos].clone().requires_grad_() for x in (q, k, v)]
    original, budget = _ring.cuda_kernels, _ring.RING_BUDGET_BYTES
    if case.emulated_kernels:
        _ring.cuda_kernels = lambda q_, params, mode: ReferenceAsKernels(params)
    _ring.RING_BUDGET_BYTES = case.extra.get("ring_budget", budget)
    try:
        got = context_parallel_moba_attention(*shard, case.block_size, case.top_k, case.causal, group=group,
                                              softmax_scale=case.softmax_scale, return_lse=True, layout=case.layout)
        got_out, got_lse = got
        got_loss = (got_out * dout[:, pos]).sum() + ((got_lse * dlse[:, pos]).sum() if case.with_lse else 0.0)
        got_grads = torch.autograd.grad(got_loss, shard)
        got_topk = route(shard[0].detach(), shard[1].detach(), Layout(tuple(case.lengths), case.layout),
                         ring_of(group), case.block_size, case.top_k, case.causal)
    finally:
        _ring.cuda_kernels, _ring.RING_BUDGET_BYTES = original, budget

    def err(a, b):
        return float((a.detach() - b.detach()).abs().max())

    return {
        "routing_equal": bool(torch.equal(got_topk, topk[:, pos])),
        "out": err(got_out, out.detach()[:, pos]),
        "lse": err(got_lse, lse.detach()[:, pos]),
        "dq": err(got_grads[0], grads[0][:, pos]),
        "dk": err(got_grads[1], grads[1][:, pos]),
        "dv": err(got_grads[2], grads[2][:, pos]),
        "scale": max(float(x.detach().abs().max()) for x in (out, *grads)),
    }


def _disagreeing_settings(rank: int) -> str:
    """Rank 1 passes another top_k: every rank must raise the same ValueError (and none may hang)."""
    q = torch.randn(1, 8, 2, 4, dtype=torch.float64)
    try:
        context_parallel_moba_attention(q, q, q, 4, 2 + (rank == 1))
    except ValueError as exc:
        return str(exc)
    return "no error"


def _one_rank_rejects_its_arguments(rank: int) -> str:
    """Rank 2 passes keys of another length than its queries, which only its own checks see: it raises its
    error, every other rank raises too (instead of waiting in the agreement's all-gather)."""
    q = torch.randn(1, 8, 2, 4, dtype=torch.float64)
    k = q[:, :5] if rank == 2 else q
    try:
        context_parallel_moba_attention(q, k, k, 4, 2)
    except ValueError as exc:
        return str(exc)
    return "no error"


def _one_rank_cannot_flag_on_its_tensors(rank: int) -> list[str]:
    """Rank 3 passes a numpy array as q, then tensors with no data (meta): no tensor of its own can carry its
    flag through the backend, yet every other rank must raise instead of waiting in the all-gather."""
    q = torch.randn(1, 8, 2, 4, dtype=torch.float64)
    messages = []
    for bad in (q.numpy(), q.to("meta")):
        try:
            context_parallel_moba_attention(bad if rank == 3 else q, q, q, 4, 2)
            messages.append("no error")
        except (TypeError, ValueError) as exc:
            messages.append(str(exc))
    return messages


def _one_rank_records_no_graph(rank: int) -> str:
    """Rank 1 calls under no_grad while the others' inputs require grad: the others' backward would wait for
    rank 1 in the ring, so every rank raises at the call."""
    q = torch.randn(1, 8, 2, 4, dtype=torch.float64, requires_grad=True)
    try:
        with torch.set_grad_enabled(rank != 1):
            context_parallel_moba_attention(q, q, q, 4, 2)
    except ValueError as exc:
        return str(exc)
    return "no error"


def _second_derivative(rank: int) -> dict:
    """A gradient penalty through the attention raises on every rank (the ring's backward has no backward); the
    first derivatives under create_graph are the plain ones, and what does not pass through them is exact."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 12, 2, 4, generator=g, dtype=torch.float64) for _ in range(3))
    shard = [x[:, 3 * rank:3 * rank + 3].clone().requires_grad_() for x in (q, k, v)]
    plain = torch.autograd.grad(context_parallel_moba_attention(*shard, 2, 2).square().sum(), shard)
    graph = torch.autograd.grad(context_parallel_moba_attention(*shard, 2, 2).square().sum(), shard,
                                create_graph=True)
    w = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    (gw,) = torch.autograd.grad((graph[0] * w).sum(), (w,), retain_graph=True)
    try:
        torch.autograd.grad(graph[0].square().sum() + (shard[0] * w).sum(), (shard[0], w))
        error = "no error"
    except RuntimeError as exc:
        error = str(exc)
    return {"same_first": all(torch.equal(a, b.detach()) for a, b in zip(plain, graph, strict=True)),
            "graph": all(b.requires_grad for b in graph), "gw": bool(torch.equal(gw, graph[0].detach().sum())),
            "error": error}


def run_world_tests(rank: int, world: int, payload: dict) -> dict:
    """In a world of four: the two-rank cases on the group of ranks 0 and 1 and the three-rank cases on ranks
    0-2 (groups other than the default, so P2P addresses global ranks), the four-rank cases on the default
    group, the benchmark's main (quick, tiny sizes), and ranks passing different settings. Per rank:
    {"cases": {name: differences}, ...}."""
    import torch.distributed as dist

    from mobalab.distributed import bench

    pair, three = dist.new_group([0, 1]), dist.new_group([0, 1, 2])  # every rank takes part in creating them
    cases = {}
    if rank < 2:
        cases.update({name: _run_case(rank, 2, CASES[name], group=pair) for name in payload["pair"]})
    if rank < 3:
        cases.update({name: _run_case(rank, 3, CASES[name], group=three) for name in payload["three"]})
    cases.update({name: _run_case(rank, world, CASES[name]) for name in payload["all"]})
    status = bench.main(["--backend", "gloo", "--quick", "--check-len", "300", "--lengths", "256,512", "--reps",
                         "1", "--out", payload["bench_out"]])
    refused = bench.main(["--backend", "gloo", "--quick", "--path", "single-device", "--out", payload["bench_out"]])
    too_short = bench.main(["--backend", "gloo", "--quick", "--check-len", "0", "--lengths", "3", "--out",
                            payload["bench_out"]])
    return {"cases": cases, "bench_status": status, "single_device_in_four": refused, "three_tokens_in_four": too_short,
            "disagree": _disagreeing_settings(rank), "one_rejects": _one_rank_rejects_its_arguments(rank),
            "no_tensor": _one_rank_cannot_flag_on_its_tensors(rank), "no_graph": _one_rank_records_no_graph(rank),
            "second_derivative": _second_derivative(rank)}


def single_device_bench(rank: int, world: int, payload: dict) -> dict:
    """The benchmark's one-GPU baseline path in a world of one: moba_attention on the whole sequence."""
    from mobalab.distributed import bench

    status = bench.main(["--backend", "gloo", "--quick", "--path", "single-device", "--check-len", "0",
                         "--lengths", "256", "--reps", "1", "--out", payload["bench_out"]])
    return {"status": status}


def gpu_case(rank: int, world: int, payload: dict) -> dict:
    """On GPU ``rank`` (NCCL): bf16 context-parallel MoBA (CUDA kernels and kernel router where they apply).

    Attention and gradients are compared with float64 single-process MoBA of the same bf16 inputs *given the
    same selections* (every rank's routing gathered); the routing with the fp32 reference router (the kernel
    router scores to ~2^-16 relative, so near-ties may go the other way).
    """
    case = Case(**payload)
    device = torch.device("cuda", rank)
    q, k, v, dout, _ = _whole(case)
    q, k, v, dout = (x.to(torch.bfloat16) for x in (q, k, v, dout))
    pos = shard_positions(case.lengths, rank, case.layout)
    shard = [x[:, pos].to(device).requires_grad_() for x in (q, k, v)]
    got = context_parallel_moba_attention(*shard, case.block_size, case.top_k, case.causal, layout=case.layout)
    got_grads = torch.autograd.grad(got, shard, dout[:, pos].to(device))

    from mobalab.distributed._routing import kernel_lists

    topk = route(shard[0].detach(), shard[1].detach(), Layout(tuple(case.lengths), case.layout), ring_of(None),
                 case.block_size, case.top_k, case.causal, lists=kernel_lists)
    longest = max(case.lengths)
    padded = torch.full((case.batch, longest, case.heads, case.top_k), -1, dtype=torch.int32, device=device)
    padded[:, :topk.shape[1]] = topk
    parts = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded)
    whole = torch.empty((case.batch, sum(case.lengths), case.heads, case.top_k), dtype=torch.int32)
    for r, part in enumerate(parts):
        whole[:, shard_positions(case.lengths, r, case.layout)] = part[:, :case.lengths[r]].cpu()

    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    out, _ = R.moba_attention_given_routing(*leaves, whole, case.block_size, case.causal)
    grads = torch.autograd.grad(out, leaves, dout.double())
    reference_topk = R.moba_topk(q.to(device), k.to(device), case.block_size, case.top_k, case.causal)[:, pos]
    agreement = (topk.sort(-1).values == reference_topk.sort(-1).values).all(-1).double().mean()

    def rel(a, b):
        a, b = a.detach().double().cpu(), b.detach().double()
        return float((a - b).norm() / b.norm())

    return {"routing_agreement": float(agreement), "out": rel(got, out[:, pos]),
            **{name: rel(g, w[:, pos]) for name, g, w in zip(("dq", "dk", "dv"), got_grads, grads, strict=True)}}


def input_precision_case(rank: int, world: int, payload: dict) -> dict:
    """bf16 keys near 1 (block means that mostly round to equal bf16 values) sharded over the ranks, routed with
    centroid_precision "input": the routing of single-process ``moba_topk`` in that precision (not the "fp32" one),
    and the output of single-process attention given that routing; then rank 1 asking for "fp32" while the others
    ask for "input": every rank raises."""
    g = torch.Generator().manual_seed(31)
    lengths, block, top_k = (37, 27), 4, 3
    n = sum(lengths)
    q = torch.randn(1, n, 2, 8, generator=g).to(torch.bfloat16)
    k = (1 + 2.0**-9 * torch.randn(1, n, 1, 8, generator=g)).to(torch.bfloat16)
    v = torch.randn(1, n, 1, 8, generator=g).to(torch.bfloat16)
    pos = shard_positions(lengths, rank, "contiguous")
    want = R.moba_topk(q, k, block, top_k, centroid_precision="input")
    got_topk = route(q[:, pos], k[:, pos], Layout(lengths, "contiguous"), ring_of(None), block, top_k, True,
                     centroid_precision="input")
    out = context_parallel_moba_attention(q[:, pos], k[:, pos], v[:, pos], block, top_k,
                                          centroid_precision="input")
    ref, _ = R.moba_attention_given_routing(q, k, v, want, block)
    try:
        context_parallel_moba_attention(q[:, pos], k[:, pos], v[:, pos], block, top_k,
                                        centroid_precision="fp32" if rank == 1 else "input")
        disagree = "no error"
    except ValueError as exc:
        disagree = str(exc)
    return {"routing_equal": bool(torch.equal(got_topk, want[:, pos])),
            "differs_from_fp32": bool(not torch.equal(want, R.moba_topk(q, k, block, top_k))),
            "out": float((out.float() - ref[:, pos].float()).abs().max()), "disagree": disagree}
