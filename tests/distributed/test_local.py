"""One ring step without processes: a query segment over a key segment, reference path against the CUDA-kernel
decomposition (head / whole-block body / tail, padding) with the kernels' contract emulated by the reference;
and the reference additions that context parallelism builds on (block sums, routing from centroids, positions).
"""

import math
import sys
from pathlib import Path

import pytest
import torch

from mobalab.distributed._local import Params, _cut, _plan, backward_pair, forward_pair
from mobalab.distributed._merge import Accumulator
from mobalab.kernels import reference as R

sys.path.insert(0, str(Path(__file__).parent))
from _cases import ReferenceAsKernels  # noqa: E402


def _combined(pieces, shape):
    acc = Accumulator(shape, torch.float64, "cpu")
    for lo, hi, out, lse in pieces:
        acc.add(lo, hi, out, lse)
    return acc.out, acc.lse


def _segment_pairs():
    """(N, B, qs, n_q, ks, n_k): same segments, keys before / after, aligned or not, shorter than a block."""
    yield 40, 8, 8, 16, 8, 16  # same aligned segment
    yield 40, 8, 5, 27, 5, 27  # same segment, head and tail
    yield 40, 8, 3, 4, 3, 4  # same segment inside one block
    yield 64, 8, 40, 20, 0, 37  # keys before, body shorter than the queries: q padded... or K/V padded
    yield 64, 8, 50, 9, 3, 45  # keys before, far more keys than queries
    yield 64, 8, 0, 30, 33, 20  # keys after the queries
    yield 64, 4, 17, 6, 22, 30  # keys after, starting mid-block
    yield 50, 8, 0, 50, 0, 50  # the whole sequence, last block partial


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("pair", list(_segment_pairs()))
def test_kernel_decomposition_equals_reference(pair, causal):
    n, block, qs, n_q, ks, n_k = pair
    g = torch.Generator().manual_seed(n * 131 + qs * 7 + ks)
    heads, kv_heads, dim, top_k = 4, 2, 8, 3
    q = torch.randn(2, n, heads, dim, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, n, kv_heads, dim, generator=g, dtype=torch.float64) for _ in range(2))
    topk = R.moba_topk(q, k, block, top_k, causal)
    params = Params(block, top_k, causal, 1 / math.sqrt(dim))
    args = (q[:, qs:qs + n_q], k[:, ks:ks + n_k], v[:, ks:ks + n_k], topk[:, qs:qs + n_q], qs, ks, params)
    shape = (2, n_q, heads, dim)
    want = _combined(forward_pair(*args), shape)
    kernels = ReferenceAsKernels(params)
    got = _combined(forward_pair(*args, kernels=kernels), shape)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    planned = [c.kind for c in _plan(qs, n_q, ks, n_k, params, kernels)]
    assert kernels.calls == sum(kind != "reference" for kind in planned)
    body = _cut(ks, n_k, block).body
    if body[1] > body[0] and (not causal or qs == ks):
        assert kernels.calls > 0, "a body of whole blocks goes to the kernels"
    if want[1].isfinite().any():
        # the backward of a step takes the combined out and lse of the whole sequence
        dout = torch.randn(shape, generator=g, dtype=torch.float64)
        dlse = torch.randn(shape[:3], generator=g, dtype=torch.float64)
        out, lse = R.moba_attention_given_routing(q, k, v, topk, block, causal)
        rows = slice(qs, qs + n_q)
        bargs = (dout, args[0], args[1], args[2], out[:, rows], lse[:, rows], args[3], dlse, qs, ks, params)

        def summed(result):
            dq, dk, dv = torch.zeros(shape, dtype=torch.float64), torch.zeros_like(args[1]), torch.zeros_like(args[1])
            for lo, hi, piece in result[0]:
                dq[:, lo:hi] += piece
            for lo, hi, a, b in result[1]:
                dk[:, lo:hi] += a
                dv[:, lo:hi] += b
            return dq, dk, dv

        torch.testing.assert_close(summed(backward_pair(*bargs, kernels=ReferenceAsKernels(params))),
                                   summed(backward_pair(*bargs)), rtol=0, atol=1e-12)


def test_plan_sends_whole_blocks_to_the_kernels():
    params = Params(8, 3, True, 1.0)
    kernels = object()
    # same segment [5, 32): head 5..7 and tail 32 (empty) to the reference, body 8..31 causal, tail queries none
    calls = _plan(5, 27, 5, 27, params, kernels)
    kinds = sorted((c.kind, c.rows, c.keys) for c in calls)
    assert kinds == [("kernel-causal", (3, 27), (3, 27)), ("reference", (0, 27), (0, 3))]
    # keys [3, 48) before queries [50, 59): head 3..7, body 8..47 free, no tail
    assert {(c.kind, c.keys) for c in _plan(50, 9, 3, 45, params, kernels)} == {
        ("reference", (0, 5)), ("kernel-free", (5, 45))}
    assert _plan(0, 30, 33, 20, params, kernels) == []  # causal: keys after every query
    cut = _cut(13, 30, 8)  # keys 13..42: head 13..15, body 16..39, tail 40..42
    assert (cut.head, cut.body, cut.tail) == ((0, 3), (3, 27), (27, 30))
    assert [c.kind for c in _plan(0, 4, 0, 4, params, None)] == ["reference"]


def test_block_sums_and_routing_from_parts():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 37, 4, 8, generator=g, dtype=torch.float64)
    k = torch.randn(1, 37, 2, 8, generator=g, dtype=torch.float64)
    cuts = [0, 6, 7, 21, 37]
    sums, counts = torch.zeros(1, 5, 2, 8, dtype=torch.float64), torch.zeros(5, dtype=torch.int64)
    for a, b in zip(cuts[:-1], cuts[1:], strict=False):
        s, c = R.moba_block_sums(k[:, a:b], 8, key_offset=a)
        sums[:, a // 8:a // 8 + s.shape[1]] += s
        counts[a // 8:a // 8 + s.shape[1]] += c
    assert counts.tolist() == [8, 8, 8, 8, 5]
    centroids = sums / counts.view(1, 5, 1, 1)
    torch.testing.assert_close(centroids, R.moba_centroids(k, 8))
    for causal in (True, False):
        want = R.moba_topk(q, k, 8, 3, causal)
        for a, b in zip(cuts[:-1], cuts[1:], strict=False):
            got = R.moba_topk_from_centroids(q[:, a:b], centroids, 8, 3, causal, query_offset=a)
            assert torch.equal(got, want[:, a:b])


def test_part_functions_validate():
    q = torch.randn(1, 8, 2, 4)
    cent = R.moba_centroids(q, 4)
    with pytest.raises(ValueError, match="key_offset must be an integer >= 0"):
        R.moba_block_sums(q, 4, key_offset=-1)
    with pytest.raises(ValueError, match="beyond the 2 centroids given"):
        R.moba_topk_from_centroids(q, cent, 4, 2, query_offset=4)
    with pytest.raises(ValueError, match="expected float"):
        R.moba_topk_from_centroids(q, cent[0], 4, 2)
    topk = R.moba_topk(q, q, 4, 2)
    with pytest.raises(ValueError, match="query_offset must be an integer >= 0 or None"):
        R.moba_attention_given_routing(q, q, q, topk, 4, query_offset=1.5)
    with pytest.raises(ValueError, match="seqlen differs"):  # whole-sequence mode keeps one length
        R.moba_attention_given_routing(q, q[:, :4], q[:, :4], topk, 4)
    out, lse = R.moba_attention_given_routing(q, q[:, :4], q[:, :4], topk, 4, key_offset=0)
    assert out.shape == q.shape and lse.shape == q.shape[:3]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("start, top_k", [(0, 3), (16, 3), (13, 3), (13, 1), (5, 2), (40, 8), (61, 4)])
def test_routing_by_frame_bound_lists_equals_reference(start, top_k, causal):
    """The kernel router's decomposition (reference < B head queries, a causal list in the frame from the first
    block boundary, a non-causal list over the blocks before it, merged by fp32 score) with the frame-bound
    lists computed by the reference: the reference's routing at global positions."""
    from mobalab.distributed._routing import reference_lists, route_segment

    g = torch.Generator().manual_seed(start * 10 + top_k)
    n, block = 80, 8
    # small integers: every score is exact whatever the order of summation, so ties are exact and frequent and
    # the merge must break them to the higher block as the reference does
    q = torch.randint(-2, 3, (2, n, 4, 16), generator=g).double()
    k = torch.randint(-2, 3, (2, n, 2, 16), generator=g).double()
    centroids = R.moba_centroids(k, block)
    want = R.moba_topk(q, k, block, top_k, causal)
    got = route_segment(q[:, start:], start, centroids, block, top_k, causal, reference_lists)
    assert torch.equal(got, want[:, start:])
