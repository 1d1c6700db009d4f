"""The attention kernels (cuda/attention.cu: the forward tile kernels, resident and streaming, their merge and the
key-block lists; cuda/attention_bwd.cu: the backward) run on the host: outputs and gradients against the fp32
reference, no GPU.

``host_emulation/attention_harness.cpp`` runs the kernel texts as NVRTC sees them, with every CUDA thread a
coroutine (cuda_host.h: switches at barriers in shuffled orders, cp.async landing only when its thread waits,
poisoned shared memory, AddressSanitizer); ldmatrix.x4 and mma.sync m16n8k16 are modelled warp-wide from the PTX
ISA fragment layouts, and the shared-memory swizzle is ptx.cuh's own. The forward and backward wrappers run as a
user calls them (the chunk plan, the torch sort of the key-block lists, every launch exactly as planned: grid,
threads, shared-memory size, arguments checked against the signature), with each launch executed by the harness,
on CPU tensors, the routing given; torch.empty returns NaN-filled tensors, so an element no kernel writes shows.
Criteria: the GPU tests' (conftest.GpuOracle): the forward within 2x, the gradients within 3x the error of the same
computation in torch's low precision, plus a floor. What this cannot show (PTX, register allocation, races between
CTAs, speed) is left to the GPU tests (tests/kernels/test_attention_gpu.py, test_backward_gpu.py) and the compile
tests. The forward runs in both partial formats (16-bit, the default, and fp32: a build option of the module). Not
emulated here: the counting-sort lists (cuda/pairs.cu, emulated in test_pairs_cpu.py) and the wgmma
kernels (variant "wgmma": test_attention_wgmma_emulation.py).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from mobalab.kernels import _cuda_attention as A
from mobalab.kernels import _cuda_backward as CB
from mobalab.kernels import _pairs as P
from mobalab.kernels import reference
from mobalab.kernels._build import source

sys.path.insert(0, str(Path(__file__).parent))
from _attention_emulation import check_grads, harness_files, head_dim_flags, kernel_table  # noqa: E402
from _emulation import NEEDS_CXX, harness_fixture, run_emulated  # noqa: E402

from conftest import GpuOracle  # noqa: E402

pytestmark = NEEDS_CXX

HEAD_DIMS = (32, 64, 96, 128, 256)  # built into the harness: every head dim of the mma.sync kernels


def _kernel_files(backward: bool = True) -> dict[str, str]:
    files = ("attention.cu", "attention_bwd.cu") if backward else ("attention.cu",)
    return harness_files({
        "attention_kernels.cu": source("attention.cu"),
        "attention_bwd_kernels.cu": source("attention_bwd.cu") if backward else "",
        "attention_kernel_table.inc": kernel_table(files, lambda d: d in HEAD_DIMS)})


pairs_harness = harness_fixture("pairs_harness", lambda: {"pairs_kernels.cu": source(P.SOURCE)}, name="pairs_harness")
harness = harness_fixture("attention_harness", _kernel_files, flags=head_dim_flags(HEAD_DIMS))
# the fp32 partial format is a build option of the forward's module (_cuda_attention.partial_defines): only the
# forward runs in it, so the backward's kernels are left out of that build
harness_fp32 = harness_fixture("attention_harness", lambda: _kernel_files(backward=False), flags=(
    *head_dim_flags(HEAD_DIMS), *(f"-D{d}" for d in A.partial_defines("fp32"))), name="harness_fp32")


def _inputs(batch, seqlen, heads, kv_heads, dim, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, seqlen, h, dim, generator=g).to(dtype) for h in (heads, kv_heads, kv_heads, heads)]


def _case_id(c) -> str:
    dtype, dim, block, causal, n, k, h, hk, det = c
    return (f"{str(dtype).split('.')[-1]}-d{dim}-B{block}-{'causal' if causal else 'full'}-N{n}-k{k}-h{h}/{hk}"
            f"{'-det' if det else ''}")


@pytest.fixture(params=["16bit"])
def emulate(request, tmp_path, monkeypatch):
    """A stand-in for ``launch`` that runs a plan in the harness built for the partial format ``request.param``
    (a plan that needs other build options would run a different kernel: refused), and the names it ran."""
    partial = request.param
    exe = request.getfixturevalue("harness_fp32" if partial == "fp32" else "harness")
    monkeypatch.setenv("MOBALAB_PAIR_SORT", "torch")
    monkeypatch.setenv("MOBALAB_ATTN_PARTIAL", partial)
    launched = []

    def run(plan):
        assert plan.defines in ((), A.partial_defines(partial)), f"{plan.kernel} needs build options {plan.defines}"
        # a pair-list kernel (the backward's gather) runs in the pair-list harness, built when first needed
        runner = request.getfixturevalue("pairs_harness") if plan.source == P.SOURCE else exe
        run_emulated(runner, tmp_path, [plan], seed=len(launched))
        launched.append(plan.kernel)

    run.launched = launched
    return run


@pytest.fixture
def emulated_forward(emulate, monkeypatch, poisoned_empty):
    """``run(q, k, v, topk, block, top_k, causal, variant, budget)`` -> (out, lse, kernels run): the forward wrapper
    with the routing given and every launch run by the harness."""

    def run(q, k, v, topk, block, top_k, causal, variant, budget=None, keep_lists=False):
        with monkeypatch.context() as m:
            m.setattr(A, "launch", emulate)
            with poisoned_empty():
                res = A._forward(q, k, v, block, top_k, causal, q.shape[-1] ** -0.5, True, topk, variant,
                                 budget, A.resolve_partial(None), None, False, keep_lists)
        return (*res, list(emulate.launched))

    return run


FORWARD_CASES = [
    # dtype, dim, block, causal, seqlen, top_k, heads, kv_heads, variant
    (torch.bfloat16, 64, 16, True, 150, 3, 2, 1, "resident"),    # N % B != 0, GQA 2, blocks of 16 keys
    (torch.float16, 32, 64, False, 200, 2, 1, 1, "streaming"),   # non-causal, the streaming kernel
    (torch.bfloat16, 128, 128, True, 300, 2, 2, 2, "streaming"),  # two 64-key steps per block
    (torch.float16, 64, 32, True, 20, 4, 2, 1, "resident"),      # N < B, k >= n
    (torch.bfloat16, 32, 32, True, 160, 8, 4, 1, "auto"),        # k >= n blocks, GQA 4
    (torch.float16, 256, 64, True, 130, 2, 2, 1, "auto"),        # head dim 256 (8 warps in column pairs)
    (torch.bfloat16, 96, 32, False, 110, 2, 3, 1, "auto"),       # head dim 96 (not a power of two), GQA 3, non-causal
]


def _forward_id(c) -> str:
    return _case_id((*c[:8], False)) + f"-{c[8]}"


@pytest.mark.parametrize("emulate", ["16bit", "fp32"], indirect=True)
@pytest.mark.parametrize("case", FORWARD_CASES, ids=[_forward_id(c) for c in FORWARD_CASES])
def test_emulated_forward_matches_oracle(emulated_forward, case):
    dtype, dim, block, causal, seqlen, top_k, heads, kv_heads, variant = case
    q, k, v, _ = _inputs(1, seqlen, heads, kv_heads, dim, dtype, seed=seqlen + dim)
    topk = reference.moba_topk(q, k, block, top_k, causal=causal)
    out, lse, launched = emulated_forward(q, k, v, topk, block, top_k, causal, A.resolve_variant(variant, dim, block))
    tile = A.kernel_names(dtype, dim, block, A.resolve_variant(variant, dim, block))[0]
    assert tile in launched and any(n.startswith("moba_attn_merge") for n in launched)
    GpuOracle.check_forward(q, k, v, topk, block, causal, out, lse, label=_forward_id(case))


def test_emulated_forward_over_chunks(emulated_forward):
    """A scratch budget that splits each sequence's queries over several chunks (each chunk's lists, tiles and
    merge): the same output as one pass within the criterion."""
    dtype, dim, block, top_k = torch.bfloat16, 64, 32, 3
    q, k, v, _ = _inputs(2, 250, 2, 1, dim, dtype, seed=6)
    topk = reference.moba_topk(q, k, block, top_k, causal=True)
    budget = 100 * 2 * top_k * A.bytes_per_pair(dim)  # about 100 queries of one kv group per chunk
    chunks = A.plan_chunks(2, 250, 2, 1, dim, top_k, budget)
    assert len(chunks) > 2 and any(c.t0 > 0 for c in chunks)
    out, lse, _ = emulated_forward(q, k, v, topk, block, top_k, True, "resident", budget)
    GpuOracle.check_forward(q, k, v, topk, block, True, out, lse, label="chunked")


@pytest.fixture
def emulated_backward(emulate, monkeypatch, poisoned_empty):
    """``run(dout, q, k, v, out, lse, topk, block, top_k, causal, deterministic, budget)`` -> ((dq, dk, dv), kernels
    run): the backward wrapper with every launch run by the harness."""

    def run(dout, q, k, v, out, lse, topk, block, top_k, causal, deterministic=False, budget=None, variant="tile",
            fwd_lists=None):
        with monkeypatch.context() as m:
            m.setattr(CB, "launch", emulate)
            m.setattr(A, "launch", emulate)
            with poisoned_empty():
                grads = CB._backward(dout, q, k, v, out, lse, topk, block, top_k, causal, q.shape[-1] ** -0.5,
                                     deterministic, None, budget, None, False, None, variant, fwd_lists)
        return grads, list(emulate.launched)

    return run


CASES = [
    # dtype, dim, block, causal, seqlen, top_k, heads, kv_heads, deterministic
    (torch.bfloat16, 64, 16, True, 150, 3, 2, 1, False),    # N % B != 0, GQA 2, blocks of 16 keys in a 64-key tile
    (torch.float16, 32, 64, False, 200, 2, 1, 1, False),    # non-causal, N % B != 0
    (torch.bfloat16, 128, 128, True, 300, 2, 2, 2, True),   # two 64-key sub-tiles, deterministic dQ (modes 1, 2)
    (torch.float16, 64, 32, True, 20, 4, 2, 1, False),      # N < B, k >= n
    (torch.bfloat16, 32, 32, True, 160, 8, 4, 1, False),    # k >= n blocks, GQA 4: rows of 4 query heads per tile
    (torch.float16, 256, 64, True, 130, 2, 2, 1, False),    # head dim 256: warp pairs behind named barriers
    (torch.bfloat16, 96, 32, True, 110, 2, 3, 1, True),     # head dim 96, GQA 3, deterministic dQ
]


@pytest.mark.parametrize("dtype,dim,batch,seqlen,heads,with_dlse,zero,tokens", [
    (torch.bfloat16, 128, 2, 37, 3, False, None, None),  # one position a CTA (few rows)
    (torch.bfloat16, 128, 2, 37, 3, False, "input", 4),  # CTAs across the sequences' seam, the last one part full
    (torch.float16, 64, 1, 50, 5, True, "fp32", 8),      # dlse subtracted in the kernel
    (torch.bfloat16, 32, 3, 7, 2, True, "input", 2),     # idle lanes (D = 32)
    (torch.float16, 96, 1, 9, 4, False, "input", 4),     # idle lanes (D = 96), 8-byte zero stores
    (torch.bfloat16, 32, 1, 2, 2100, False, "fp32", 1),  # more rows than a CTA stages: stats written directly
])
def test_emulated_delta_and_row_stats(emulate, monkeypatch, poisoned_empty, dtype, dim, batch, seqlen, heads,
                                      with_dlse, zero, tokens):
    """The delta kernel's D = dO.O - dlse, and the rows' head-major (lse log2(e), D) it writes beside it for the
    row records: the stats equal :func:`row_stats` of its own D bit for bit (the path of a D computed elsewhere),
    D the fp64 sum within fp32 rounding; the dQ accumulator it zeroes on the way (fp32 or the inputs' type) all
    zeros; every element written (poisoned buffers)."""
    g = torch.Generator().manual_seed(seqlen * heads + dim)
    out, dout = (torch.randn(batch, seqlen, heads, dim, generator=g).to(dtype) for _ in range(2))
    lse = torch.randn(batch, seqlen, heads, generator=g) * 4
    dlse = torch.randn(batch, seqlen, heads, generator=g) if with_dlse else None
    zero_rows = None if zero is None else torch.full(out.shape, math.nan, dtype=dtype if zero == "input" else
                                                      torch.float32)
    with monkeypatch.context() as m:
        m.setattr(CB, "launch", emulate)
        with poisoned_empty():
            delta, stats = CB._delta(out, dout, dlse, 0 if zero_rows is None else zero_rows, lse=lse, tokens=tokens)
    assert emulate.launched == [CB.bwd_kernel_names(dtype, dim)[0]]
    want = (out.double() * dout.double()).sum(-1) - (0 if dlse is None else dlse.double())
    torch.testing.assert_close(delta.view(batch, seqlen, heads).double(), want, rtol=1e-5, atol=1e-5)
    assert stats.shape == (batch, heads, seqlen, 2)
    assert torch.equal(stats, CB.row_stats(lse, delta))
    assert torch.equal(stats[..., 0], (lse * CB.LOG2E_F32).transpose(1, 2))
    assert torch.equal(stats[..., 1], delta.view(batch, seqlen, heads).transpose(1, 2))
    if zero_rows is not None:
        assert torch.equal(zero_rows, torch.zeros_like(zero_rows))


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_emulated_gradients_match_oracle(emulated_backward, case):
    dtype, dim, block, causal, seqlen, top_k, heads, kv_heads, det = case
    q, k, v, dout = _inputs(1, seqlen, heads, kv_heads, dim, dtype, seed=seqlen + dim)
    topk = reference.moba_topk(q, k, block, top_k, causal=causal)
    out, lse = reference.moba_attention_given_routing(q.float(), k.float(), v.float(), topk, block, causal=causal)
    grads, launched = emulated_backward(dout, q, k, v, out.to(dtype), lse, topk, block, top_k, causal, det)
    main = f"moba_bwd_{'bf16' if dtype == torch.bfloat16 else 'f16'}_d{dim}"
    assert main in launched and ("moba_bwd_dq_merge" in " ".join(launched)) == det
    check_grads(grads, q, k, v, dout, topk, block, causal, _case_id(case))


BLOCK_CASES = [
    # the "block" variant (8 warps per 128 keys): dtype, dim, block, causal, seqlen, top_k, heads, kv_heads, det
    (torch.bfloat16, 128, 128, True, 300, 2, 2, 2, False),   # N % 128 != 0: the last block's keys masked
    (torch.float16, 64, 256, True, 600, 2, 4, 1, True),      # two 128-key sub-tiles, GQA 4, deterministic dQ
    (torch.bfloat16, 64, 128, False, 200, 3, 2, 1, False),   # non-causal
    (torch.float16, 128, 128, True, 100, 3, 1, 1, True),     # N < B, k >= n
]


@pytest.mark.parametrize("case", BLOCK_CASES, ids=[_case_id(c) for c in BLOCK_CASES])
def test_emulated_block_variant_gradients_match_oracle(emulated_backward, case):
    dtype, dim, block, causal, seqlen, top_k, heads, kv_heads, det = case
    q, k, v, dout = _inputs(1, seqlen, heads, kv_heads, dim, dtype, seed=seqlen + dim + 1)
    topk = reference.moba_topk(q, k, block, top_k, causal=causal)
    out, lse = reference.moba_attention_given_routing(q.float(), k.float(), v.float(), topk, block, causal=causal)
    grads, launched = emulated_backward(dout, q, k, v, out.to(dtype), lse, topk, block, top_k, causal, det,
                                        variant="block")
    main = f"moba_bwd_blk_{'bf16' if dtype == torch.bfloat16 else 'f16'}_d{dim}"
    assert main in launched and not any(n.startswith("moba_bwd_bf16_d") or n.startswith("moba_bwd_f16_d")
                                        for n in launched)
    check_grads(grads, q, k, v, dout, topk, block, causal, "block-" + _case_id(case))


def test_emulated_backward_over_the_forwards_kept_lists(emulated_forward, emulated_backward):
    """The forward keeps its key-block lists (keep_lists) and the backward runs over them: no index building in
    the backward, gradients within the criterion and dK / dV bit-identical to a backward that builds its lists
    (the same lists, summed in the same order). Two chunks (batch 2), so the second chunk's offsets count."""
    dtype, dim, block, top_k, causal = torch.bfloat16, 64, 32, 3, True
    q, k, v, dout = _inputs(2, 150, 2, 1, dim, dtype, seed=11)
    topk = reference.moba_topk(q, k, block, top_k, causal=causal).to(torch.int32)
    assert CB.forward_lists_reusable(2, 150, 2, 1, dim, top_k, False)
    out, lse, lists, _ = emulated_forward(q, k, v, topk, block, top_k, causal, "resident", keep_lists=True)
    chunks = CB.bwd_plan(2, 150, 2, 1, dim, top_k, False)
    assert len(chunks) == 2 and lists.numel() == A.kept_lists_layout(chunks, top_k, 5, 2)[1]
    grads, launched = emulated_backward(dout, q, k, v, out, lse, topk, block, top_k, causal, fwd_lists=lists)
    bwd_kernels = launched[launched.index(next(n for n in launched if n.startswith("moba_bwd_delta"))):]
    assert not any(n.startswith(("moba_pairs", "moba_attn_keys", "moba_attn_bounds")) for n in bwd_kernels), bwd_kernels
    check_grads(grads, q, k, v, dout, topk, block, causal, "kept lists")
    rebuilt, _ = emulated_backward(dout, q, k, v, out, lse, topk, block, top_k, causal)
    for name, a, b in zip("kv", grads[1:], rebuilt[1:], strict=True):
        assert torch.equal(a, b), f"d{name} over the kept lists differs from the rebuilt lists'"


@pytest.mark.parametrize("det", [False, True], ids=["atomic-dq", "det"])
def test_emulated_backward_gathers_from_finer_forward_chunks(emulated_forward, emulated_backward, monkeypatch, det):
    """Where the forward's budget splits the kv heads finer than the backward's (32K and 64K at the benchmark's
    shapes; forced here), the backward gathers each chunk's lists from the kept ones (moba_pairs_gather): no sort
    in the backward, gradients within the criterion, dK / dV bit-identical to lists built for the chunk."""
    dtype, dim, block, top_k, causal = torch.float16, 64, 32, 3, True
    batch, seqlen, heads, kv_heads = 2, 130, 6, 3
    q, k, v, dout = _inputs(batch, seqlen, heads, kv_heads, dim, dtype, seed=21)
    topk = reference.moba_topk(q, k, block, top_k, causal=causal).to(torch.int32)
    budget = seqlen * 2 * (heads // kv_heads) * top_k * A.bytes_per_pair(dim)  # forward chunks of 2 kv heads
    monkeypatch.setattr(A, "default_scratch_budget", lambda *a, **kw: budget)
    monkeypatch.setattr(A, "forward_scratch_budget", lambda *a, **kw: budget)
    fwd_plan = CB.forward_plan(batch, seqlen, heads, kv_heads, dim, top_k)
    assert [c.n_heads for c in fwd_plan] == [4, 2, 4, 2]
    assert fwd_plan != CB.bwd_plan(batch, seqlen, heads, kv_heads, dim, top_k, det)
    assert CB.forward_lists_reusable(batch, seqlen, heads, kv_heads, dim, top_k, det)
    out, lse, lists, _ = emulated_forward(q, k, v, topk, block, top_k, causal, "resident", keep_lists=True)
    grads, launched = emulated_backward(dout, q, k, v, out, lse, topk, block, top_k, causal, det, fwd_lists=lists)
    bwd_kernels = launched[launched.index(next(n for n in launched if n.startswith("moba_bwd_delta"))):]
    assert "moba_pairs_gather" in bwd_kernels
    assert not any(n.startswith(("moba_pairs_count", "moba_pairs_radix", "moba_attn_keys", "moba_attn_bounds"))
                   for n in bwd_kernels)
    check_grads(grads, q, k, v, dout, topk, block, causal, "gathered lists")
    rebuilt, _ = emulated_backward(dout, q, k, v, out, lse, topk, block, top_k, causal, det)
    for name, a, b in zip("qkv", grads, rebuilt, strict=True):
        if name != "q" or det:
            assert torch.equal(a, b), f"d{name} over the gathered lists differs from the rebuilt lists'"


def test_emulated_backward_gathers_from_forward_chunks_over_query_parts(emulated_forward, emulated_backward,
                                                                       monkeypatch):
    """Where the forward's budget splits each head's queries (beyond ~1.3M tokens at the benchmark's shapes, or a
    budget given; forced here: three chunks per head, the last one shorter) and the backward's chunks cover whole
    sequences, each backward segment is gathered from the forward's segments of its head in query order (pieces, each
    with its own pair-index shift): no sort in the backward, gradients within the criterion, dK / dV bit-identical to
    lists built for the chunk."""
    dtype, dim, block, top_k, causal = torch.bfloat16, 64, 32, 3, True
    batch, seqlen, heads, kv_heads = 2, 150, 2, 2
    q, k, v, dout = _inputs(batch, seqlen, heads, kv_heads, dim, dtype, seed=31)
    topk = reference.moba_topk(q, k, block, top_k, causal=causal).to(torch.int32)
    budget = 60 * top_k * A.bytes_per_pair(dim)  # 60 queries of one head per forward chunk
    monkeypatch.setattr(A, "default_scratch_budget", lambda *a, **kw: budget)
    monkeypatch.setattr(A, "forward_scratch_budget", lambda *a, **kw: budget)
    fwd_plan = CB.forward_plan(batch, seqlen, heads, kv_heads, dim, top_k)
    assert [(c.n_heads, c.t0, c.n_q) for c in fwd_plan[:3]] == [(1, 0, 50), (1, 50, 50), (1, 100, 50)]
    assert all(c.t0 == 0 and c.n_q == seqlen for c in CB.bwd_plan(batch, seqlen, heads, kv_heads, dim, top_k, False))
    assert CB.forward_lists_reusable(batch, seqlen, heads, kv_heads, dim, top_k, False)
    out, lse, lists, _ = emulated_forward(q, k, v, topk, block, top_k, causal, "resident", keep_lists=True)
    grads, launched = emulated_backward(dout, q, k, v, out, lse, topk, block, top_k, causal, fwd_lists=lists)
    bwd_kernels = launched[launched.index(next(n for n in launched if n.startswith("moba_bwd_delta"))):]
    assert "moba_pairs_gather" in bwd_kernels
    assert not any(n.startswith(("moba_pairs_count", "moba_pairs_radix", "moba_attn_keys", "moba_attn_bounds"))
                   for n in bwd_kernels)
    check_grads(grads, q, k, v, dout, topk, block, causal, "gathered from query parts")
    rebuilt, _ = emulated_backward(dout, q, k, v, out, lse, topk, block, top_k, causal)
    for name, a, b in zip("kv", grads[1:], rebuilt[1:], strict=True):
        assert torch.equal(a, b), f"d{name} over the gathered lists differs from the rebuilt lists'"


def test_emulated_chunks_that_split_the_query_range(emulated_backward):
    """A scratch budget that splits each sequence's queries over several chunks: dK and dV accumulate in fp32 over
    the chunks (store, then add) before their conversion."""
    dtype, dim, block, top_k = torch.bfloat16, 64, 32, 3
    q, k, v, dout = _inputs(2, 250, 2, 1, dim, dtype, seed=5)
    topk = reference.moba_topk(q, k, block, top_k, causal=True)
    out, lse = reference.moba_attention_given_routing(q.float(), k.float(), v.float(), topk, block, causal=True)
    budget = 100 * 2 * top_k * CB.bwd_bytes_per_pair(dim, False)  # about 100 queries of one kv group per chunk
    chunks = CB.bwd_plan(2, 250, 2, 1, dim, top_k, False, budget)
    assert len(chunks) > 2 and any(c.t0 > 0 for c in chunks)
    grads, _ = emulated_backward(dout, q, k, v, out.to(dtype), lse, topk, block, top_k, True, budget=budget)
    check_grads(grads, q, k, v, dout, topk, block, True, "chunked")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_emulated_folded_batch_is_bit_identical(emulated_forward, emulated_backward, causal):
    """A batch of equal-length sequences (N a multiple of B) attended as one sequence of batch * N tokens with the
    routing renumbered (mobalab.kernels._batch_fold) gives the per-sequence chunks' outputs, LSE and gradients bit
    for bit (deterministic dQ: the same slot partials merged in the same order), in one chunk instead of two."""
    from mobalab.kernels._batch_fold import folded_topk

    dtype, dim, block, top_k, batch, seqlen, heads, kv_heads = torch.bfloat16, 64, 32, 3, 2, 128, 2, 1
    q, k, v, dout = _inputs(batch, seqlen, heads, kv_heads, dim, dtype, seed=31)
    topk = reference.moba_topk(q, k, block, top_k, causal=causal).to(torch.int32)
    ftopk = folded_topk(topk, seqlen // block)
    assert (ftopk[1][ftopk[1] >= 0] >= seqlen // block).all() and torch.equal(ftopk[0], topk[0])

    def one(x):
        return x.reshape(1, batch * seqlen, *x.shape[2:])

    out, lse, _ = emulated_forward(q, k, v, topk, block, top_k, causal, "resident")
    n_merge = sum(n.startswith("moba_attn_merge") for n in _)
    fout, flse, launched = emulated_forward(one(q), one(k), one(v), one(ftopk), block, top_k, causal, "resident")
    assert n_merge == 2 and sum(n.startswith("moba_attn_merge") for n in launched) - n_merge == 1
    assert torch.equal(fout.view(q.shape), out) and torch.equal(flse.view(lse.shape), lse)
    grads, _ = emulated_backward(dout, q, k, v, out, lse, topk, block, top_k, causal, deterministic=True)
    fgrads, _ = emulated_backward(one(dout), one(q), one(k), one(v), one(out), one(lse), one(ftopk), block, top_k,
                                  causal, deterministic=True)
    for name, a, b in zip("qkv", grads, fgrads, strict=True):
        assert torch.equal(a, b.view(a.shape)), f"d{name} of the folded batch differs"
