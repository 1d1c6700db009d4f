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
    return acc.result()


def _summed(result, q_shape, n_keys):
    """dq, dk, dv of a ring step from its pieces (rows of the query segment, keys of the key segment)."""
    dq_pieces, dkv_pieces = result
    dq = torch.zeros(q_shape, dtype=torch.float64)
    dk = torch.zeros(q_shape[0], n_keys, *dkv_pieces[0][2].shape[2:], dtype=torch.float64) if dkv_pieces else None
    dv = None if dk is None else torch.zeros_like(dk)
    for lo, hi, piece in dq_pieces:
        dq[:, lo:hi] += piece
    for lo, hi, a, b in dkv_pieces:
        dk[:, lo:hi] += a
        dv[:, lo:hi] += b
    return dq, dk, dv


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

        torch.testing.assert_close(_summed(backward_pair(*bargs, kernels=ReferenceAsKernels(params)), shape, n_k),
                                   _summed(backward_pair(*bargs), shape, n_k), rtol=0, atol=1e-12)


def _in_place_case(pair, causal, salt, monkeypatch):
    """fp32 batch-1 inputs of a segment pair with their routing, and the sums' buffers poisoned (NaN)."""
    from mobalab.distributed import _merge

    real_empty = torch.empty
    monkeypatch.setattr(_merge.torch, "empty", lambda *a, **kw: real_empty(*a, **kw).fill_(math.nan))
    n, block, qs, _, ks, _ = pair
    g = torch.Generator().manual_seed(n * salt + qs + ks)
    heads, kv_heads, dim, top_k = 4, 2, 8, 3
    q = torch.randn(1, n, heads, dim, generator=g)
    k, v = (torch.randn(1, n, kv_heads, dim, generator=g) for _ in range(2))
    topk = R.moba_topk(q, k, block, top_k, causal)
    return g, q, k, v, topk, Params(block, top_k, causal, 1 / math.sqrt(dim))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("pair", list(_segment_pairs()))
def test_pair_gradients_written_in_place_equal_the_pieces(pair, causal, monkeypatch):
    """A sink's fp32 sums written by the kernels in place (dQ added, dK / dV stored on fresh rows, added
    after) equal the pieces summed, for two passes over the same pair (fresh, then not); sums start as NaN,
    so a row that is stored or zeroed wrongly shows."""
    from mobalab.distributed import _merge
    from mobalab.distributed._local import KeySums, Sink

    n, block, qs, n_q, ks, n_k = pair
    g, q, k, v, topk, params = _in_place_case(pair, causal, 17, monkeypatch)
    heads, kv_heads, dim = q.shape[2], k.shape[2], q.shape[3]
    out, lse = R.moba_attention_given_routing(q, k, v, topk, block, causal)
    if not lse[:, qs:qs + n_q].isfinite().any():
        return
    rows = slice(qs, qs + n_q)
    dout = torch.randn(1, n_q, heads, dim, generator=g)
    bargs = (dout, q[:, rows], k[:, ks:ks + n_k], v[:, ks:ks + n_k], out[:, rows], lse[:, rows], topk[:, rows],
             None, qs, ks, params)
    want = _summed(backward_pair(*bargs), (1, n_q, heads, dim), n_k)
    # the sums are longer than the segments (rows 3.. and keys 2.. of them): views at an offset
    dq_sum = _merge.GradientSum((1, n_q + 5, heads, dim), torch.float32, "cpu")
    kv = KeySums((1, n_k + 4, kv_heads, dim), torch.float32, "cpu")
    kernels = ReferenceAsKernels(params, into_dtype=torch.float32)
    for _ in range(2):
        assert backward_pair(*bargs, kernels=kernels, sink=Sink(dq_sum, 3, kv, 2)) is None
    planned = [c for c in _plan(qs, n_q, ks, n_k, params, kernels) if c.kind != "reference"]
    padded = sum(c.kind == "kernel-free" and c.rows[1] - c.rows[0] != c.keys[1] - c.keys[0] for c in planned)
    assert kernels.in_place == 2 * (len(planned) - padded)
    dk, dv = kv.result()
    if dk is None:  # no key of the segment is attended (causal, keys after the queries)
        assert want[1] is None and not dq_sum.result().any()
        return
    got = dq_sum.result()[:, 3:3 + n_q], dk[:, 2:2 + n_k], dv[:, 2:2 + n_k]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.double(), 2 * b.double(), rtol=1e-5, atol=1e-5)
    for untouched in (dq_sum.value[:, :3], dk[:, :2], dk[:, 2 + n_k:]):
        assert not untouched.any()


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("pair", list(_segment_pairs()))
def test_pair_outputs_merged_in_place_equal_the_pieces(pair, causal, monkeypatch):
    """An fp32 accumulator that the kernels merge into in place (stored on fresh rows, folded by log-sum-exp
    after) equals the pieces folded; two passes over the same pair give the same attention (the fold of a part
    with itself) and the rows outside the segment stay (0, -inf). Buffers start as NaN."""
    from mobalab.distributed import _merge

    n, block, qs, n_q, ks, n_k = pair
    g, q, k, v, topk, params = _in_place_case(pair, causal, 19, monkeypatch)
    heads, dim = q.shape[2], q.shape[3]
    args = (q[:, qs:qs + n_q], k[:, ks:ks + n_k], v[:, ks:ks + n_k], topk[:, qs:qs + n_q], qs, ks, params)
    want_out, want_lse = _combined(forward_pair(*args), (1, n_q, heads, dim))
    acc = _merge.Accumulator((1, n_q + 5, heads, dim), torch.float32, "cpu")
    kernels = ReferenceAsKernels(params, into_dtype=torch.float32)
    for _ in range(2):
        assert forward_pair(*args, kernels=kernels, acc=acc, row0=3) is None
    planned = [c for c in _plan(qs, n_q, ks, n_k, params, kernels) if c.kind != "reference"]
    padded = sum(c.kind == "kernel-free" and c.rows[1] - c.rows[0] != c.keys[1] - c.keys[0] for c in planned)
    assert kernels.in_place == 2 * (len(planned) - padded)
    out, lse = acc.result()
    finite = want_lse.isfinite()
    assert torch.equal(lse[:, 3:3 + n_q].isfinite(), finite)
    torch.testing.assert_close(lse[:, 3:3 + n_q][finite].double(), want_lse[finite].double() + math.log(2),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:, 3:3 + n_q].double(), want_out.double(), rtol=1e-5, atol=1e-5)
    assert not out[:, :3].any() and (lse[:, :3] == -math.inf).all()


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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_block_sums_of_any_part_equal_the_sums_of_its_keys(dtype):
    """Parts that start and end anywhere (inside one block, at boundaries, whole blocks only), batch 2: each
    touched block's sum is the fp32 sum of exactly the keys the part holds."""
    g = torch.Generator().manual_seed(11)
    k = torch.randn(2, 70, 3, 4, generator=g).to(dtype)
    for a, b in [(0, 70), (0, 8), (3, 5), (5, 8), (8, 24), (6, 30), (13, 70), (16, 17), (69, 70)]:
        sums, counts = R.moba_block_sums(k[:, a:b], 8, key_offset=a)
        first = a // 8
        want = torch.zeros(2, sums.shape[1], 3, 4)
        for i in range(a, b):
            want[:, i // 8 - first] += k[:, i].float()
        assert sums.dtype == torch.float32 and counts.tolist() == [
            min(b, (j + 1) * 8) - max(a, j * 8) for j in range(first, first + sums.shape[1])]
        torch.testing.assert_close(sums, want, rtol=1e-5, atol=1e-5)


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
def test_routing_at_a_query_offset_equals_reference(start, top_k, causal):
    """A segment routed at its query offset (the contract of kernel_lists, here by the reference) equals the
    whole sequence's routing at those positions, exact ties included (cut blocks, offsets inside a block)."""
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


def test_cuda_adapters_call_the_wrappers_as_they_take_arguments(monkeypatch):
    """CudaKernels hands the CUDA wrappers what their signatures and checks take (bound here against the real
    signatures, the work done by the reference), so a ring step through it equals the reference step."""
    import inspect

    from mobalab.distributed._local import CudaKernels
    from mobalab.kernels import _contract as C
    from mobalab.kernels import _cuda_attention, _cuda_backward

    real_forward, real_backward = _cuda_attention.moba_attention_cuda, _cuda_backward.moba_attention_backward_cuda

    def bound(real, args, kwargs):
        call = inspect.signature(real).bind(*args, **kwargs)
        call.apply_defaults()
        return call.arguments

    def forward(*args, **kwargs):
        a = bound(real_forward, args, kwargs)
        C.check_inputs("forward", a["q"], a["k"], a["v"], path="reference")
        C.check_topk_indices("forward", a["topk_indices"], a["q"], a["top_k"])
        assert a["return_lse"] is True
        return R.moba_attention_given_routing(a["q"], a["k"], a["v"], a["topk_indices"], a["block_size"],
                                              a["causal"], a["softmax_scale"])

    def backward(*args, **kwargs):
        a = bound(real_backward, args, kwargs)
        C.check_inputs("backward", a["q"], a["k"], a["v"], path="reference")
        C.check_like("backward", "out", a["out"], a["q"].shape, dtypes=(a["q"].dtype,))
        C.check_topk_indices("backward", a["topk"], a["q"], a["top_k"], name="topk")
        return R.moba_attention_backward(a["dout"], a["q"], a["k"], a["v"], a["out"], a["lse"], a["topk"],
                                         a["block_size"], a["causal"], a["scale"], a["dlse"])

    monkeypatch.setattr(_cuda_attention, "moba_attention_cuda", forward)
    monkeypatch.setattr(_cuda_backward, "moba_attention_backward_cuda", backward)
    g = torch.Generator().manual_seed(5)
    n, block, (qs, n_q, ks, n_k) = 300, 16, (200, 100, 5, 180)
    q = torch.randn(1, n, 4, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, n, 2, 8, generator=g, dtype=torch.float64) for _ in range(2))
    for causal in (True, False):
        topk = R.moba_topk(q, k, block, 3, causal)
        params = Params(block, 3, causal, 0.3)
        args = (q[:, qs:qs + n_q], k[:, ks:ks + n_k], v[:, ks:ks + n_k], topk[:, qs:qs + n_q], qs, ks, params)
        shape = (1, n_q, 4, 8)
        torch.testing.assert_close(_combined(forward_pair(*args, kernels=CudaKernels(params)), shape),
                                   _combined(forward_pair(*args), shape))
        out, lse = R.moba_attention_given_routing(q, k, v, topk, block, causal, 0.3)
        dout = torch.randn(shape, generator=g, dtype=torch.float64)
        bargs = (dout, *args[:3], out[:, qs:qs + n_q], lse[:, qs:qs + n_q], args[3], None, qs, ks, params)
        torch.testing.assert_close(_summed(backward_pair(*bargs, kernels=CudaKernels(params)), shape, n_k),
                                   _summed(backward_pair(*bargs), shape, n_k))


def test_kernel_router_launch_plans_match_the_cuda_sources(monkeypatch):
    """kernel_lists' launches pass check_args against the .cu signatures; emulating the two kernels (split of
    the fp32 centroids, top-k at the query offset) by the reference then routes as the reference does."""
    from mobalab.distributed._routing import kernel_lists, route_segment
    from mobalab.kernels import _launch

    launched = []

    def launch(plan):
        _launch.check_args(plan.source, plan.kernel, plan.args)
        launched.append(plan.kernel)
        if plan.kernel.startswith("moba_split_centroids"):
            cent, hi, lo = plan.args[:3]
            hi.copy_(cent.permute(0, 2, 1, 3))
            lo.copy_(cent.permute(0, 2, 1, 3) - hi.float())
        else:
            q, hi, lo, out = plan.args[:4]
            cent = (hi.double() + lo.double()).permute(0, 2, 1, 3)
            out.copy_(R.moba_topk_from_centroids(q, cent, int(plan.args[7]), int(plan.args[9]),
                                                 "_causal_" in plan.kernel, query_offset=int(plan.args[10])))

    monkeypatch.setattr(_launch, "launch", launch)
    g = torch.Generator().manual_seed(7)
    # multiples of 1/8, exact in bf16: the split loses nothing and the emulation scores like the reference
    q = (torch.randint(-8, 9, (1, 700, 4, 64), generator=g) / 8).to(torch.bfloat16)
    k = (torch.randint(-8, 9, (1, 700, 2, 64), generator=g) / 8).to(torch.bfloat16)
    centroids = R.moba_centroids(k, 64)
    for causal in (True, False):
        got = route_segment(q[:, 300:], 300, centroids, 64, 4, causal, kernel_lists)
        assert torch.equal(got, R.moba_topk(q, k, 64, 4, causal)[:, 300:])
    # one top-k launch per call, at the segment's offset (no second list over the blocks before it)
    assert [n.split("_")[4] for n in launched if n.startswith("moba_topk")] == ["causal", "full"]


def test_accumulator_folds_parts_by_log_sum_exp():
    """Fresh ranges are copied in, later parts folded: equal to lse = log sum e^lse_p, o = sum e^(lse_p - lse) o_p,
    rows that no part attends stay (0, -inf), whatever the order of the parts."""
    g = torch.Generator().manual_seed(5)
    shape = (2, 12, 3, 4)
    parts = []
    for lo, hi in ((0, 6), (6, 12), (3, 9), (0, 12), (10, 12)):
        out = torch.randn(2, hi - lo, 3, 4, generator=g, dtype=torch.float64)
        lse = torch.randn(2, hi - lo, 3, generator=g, dtype=torch.float64)
        lse[:, ::3, 1] = -math.inf  # nothing attended there: out 0 by contract
        out[:, ::3, 1] = 0.0
        parts.append((lo, hi, out, lse))
    want_lse = torch.full(shape[:3], -math.inf, dtype=torch.float64)
    for lo, hi, _, lse in parts:
        want_lse[:, lo:hi] = torch.logaddexp(want_lse[:, lo:hi], lse)
    want_out = torch.zeros(shape, dtype=torch.float64)
    for lo, hi, out, lse in parts:
        w = torch.exp(lse - want_lse[:, lo:hi]).nan_to_num(0.0).unsqueeze(-1)
        want_out[:, lo:hi] += w * out
    for order in (parts, parts[::-1]):
        got_out, got_lse = _combined(order, shape)
        torch.testing.assert_close(got_lse, want_lse)
        torch.testing.assert_close(got_out, want_out)
    lonely = torch.full((1, 4, 1), -math.inf, dtype=torch.float64)
    got_out, got_lse = _combined([(0, 4, torch.zeros(1, 4, 1, 2, dtype=torch.float64), lonely)], (1, 6, 1, 2))
    assert torch.isinf(got_lse).all() and not got_out.any()


def test_gradient_sum_copies_fresh_rows_adds_the_rest_and_zeroes_untouched():
    from mobalab.distributed._merge import GradientSum

    g = torch.Generator().manual_seed(9)
    total = GradientSum((2, 20, 3), torch.float64, "cpu")
    want = torch.zeros(2, 20, 3, dtype=torch.float64)
    for lo, hi in ((4, 9), (6, 14), (0, 3), (4, 9), (12, 16)):  # overlaps, repeats, a gap at 3 and 16..19
        piece = torch.randn(2, hi - lo, 3, generator=g).to(torch.bfloat16)
        total.add(lo, hi, piece)
        want[:, lo:hi] += piece.double()
    # add_to: only written rows reach the target; untouched ones (3, 16..19, poisoned here) are not read
    total.value[:, 3] = math.nan
    total.value[:, 16:] = math.nan
    target = torch.full((2, 17, 3), 7.0, dtype=torch.float64)
    total.add_to(target, 2, 19)
    torch.testing.assert_close(target, 7.0 + want[:, 2:19])
    torch.testing.assert_close(total.result(), want)
