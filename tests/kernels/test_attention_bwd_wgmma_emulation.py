"""The wgmma backward kernel (cuda/attention_bwd_wgmma.cu, variant "wgmma") run on the host: the gradients against
the fp32 reference, no GPU.

``host_emulation/attention_bwd_wgmma_harness.cpp`` runs the kernel texts as NVRTC sees them (head dim 128), with
every CUDA thread a coroutine (cuda_host.h: switches at barriers in shuffled orders, named barriers and warpgroup
meetings released either at once or after every other thread has gone as far as it can, cp.async landing only when
its thread waits, poisoned shared memory, AddressSanitizer) and the warpgroup MMAs modelled by ``wgmma_host_model.h``:
S^T and dP^T with both operands K-major from 128-byte-swizzled shared memory, dV and dK with P^T / dS^T from
registers and Q / dO as MN-major B operands, dQ with dS^T and K both MN-major, each MMA reading shared memory and
writing its accumulators only when its warpgroup waits for it (the four commit groups of a tile waited for at their
own points). So a wrong descriptor, layout, fragment packing, accumulator mapping or wait count, a buffer refilled
while an MMA on it is pending (the three-deep gather), or a missing barrier (the named barriers between the
warpgroups: the dS^T exchange, the staged dQ rows) gives wrong gradients or an emulation error. The backward wrapper
runs as a user calls it (the chunk plan, the torch sort of the key-block lists, the segments' longest-first order,
every launch exactly as planned: grid, threads, shared-memory size, arguments checked against the signature), with
each launch, attention.cu's list kernels, attention_bwd.cu's delta, row record and dQ merge kernels and pairs.cu's
order included, executed by the harness on CPU tensors, the routing given; torch.empty returns NaN-filled tensors, so
an element no kernel writes shows. Both dQ modes run: atomic (the rows staged in shared memory, added by bulk
reductions into the fp32 accumulator or into a dQ of the input type, each 16-bit sum rounded; the CTAs run one after
another) and deterministic (slot partials, the merge; two runs in other
CTA and thread orders bit-identical). Criterion: the GPU tests' (conftest.GpuOracle: each gradient within 3x the error
of the same computation in torch's low precision, plus a floor), as for the mma.sync variants
(test_attention_emulation.py). Not emulated: what only hardware shows (PTX, the async-proxy fences, races between
CTAs, speed: tests/kernels/test_backward_gpu.py).
"""

from __future__ import annotations

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
from _attention_emulation import check_grads, harness_files, head_dim_flags, kernel_table, launcher, wgmma_text  # noqa: E402
from _build_options import BWD_OPTION_SETS  # noqa: E402
from _emulation import NEEDS_CXX, harness_fixture  # noqa: E402

pytestmark = NEEDS_CXX

DIM = 128  # the wgmma backward's only head dim; the harness builds no other
_SOURCES = (A.SOURCE, CB.SOURCE, P.SOURCE, CB.WGMMA_SOURCE)  # in the harness' order of inclusion


def _kernel_files() -> dict[str, str]:
    # the kernels of head dim 128 or none of the four sources, each thread of the wgmma main kernels checked for
    # wgmma groups it never waited for
    table = kernel_table(_SOURCES, lambda d: d == DIM, idle_checked=(CB.WGMMA_SOURCE,))
    return harness_files({"attention_kernels.cu": source(A.SOURCE), "attention_bwd_kernels.cu": source(CB.SOURCE),
                          "pairs_kernels.cu": source(P.SOURCE),
                          "attention_bwd_wgmma_kernels.cu": wgmma_text(CB.WGMMA_SOURCE),
                          "attention_bwd_wgmma_kernel_table.inc": table})


# The wgmma main kernel's build options (CB.WGMMA_BUILD_OPTIONS) in three more harnesses, one
# per set of _build_options.BWD_OPTION_SETS. Every path of each build is run by the cases below (among them full tiles
# past a causal diagonal block and full non-causal ones, which the unmasked path takes; the deterministic dQ modes,
# which the dQ-next loop runs a tile late from the previous tile's pair indices).
harness = harness_fixture("attention_bwd_wgmma_harness", _kernel_files, flags=head_dim_flags((DIM,)))
harness_serial, harness_dq_next, harness_plain = (
    harness_fixture("attention_bwd_wgmma_harness", _kernel_files, name=f"harness_{key}",
                    flags=head_dim_flags((DIM,)) + tuple(f"-D{o}" for o in opts))
    for key, opts in BWD_OPTION_SETS.items())


def _emulated_backward(harness, tmp_path, monkeypatch, poisoned_empty):
    monkeypatch.setenv("MOBALAB_PAIR_SORT", "torch")
    emulate = launcher(harness, tmp_path, _SOURCES)
    launched = emulate.launched

    def run(dout, q, k, v, out, lse, topk, block, top_k, causal, deterministic=False, budget=None):
        first = len(launched)
        with monkeypatch.context() as m:
            m.setattr(CB, "launch", emulate)
            m.setattr(A, "launch", emulate)
            m.setattr(P, "launch", emulate)
            with poisoned_empty():
                grads = CB._backward(dout, q, k, v, out, lse, topk, block, top_k, causal, q.shape[-1] ** -0.5,
                                     deterministic, None, budget, None, False, None, "wgmma", None)
        return grads, launched[first:]

    return run


@pytest.fixture
def emulated_backward(harness, tmp_path, monkeypatch, poisoned_empty):
    """``run(dout, q, k, v, out, lse, topk, block, top_k, causal, deterministic, budget)`` -> ((dq, dk, dv), kernels
    run): the backward wrapper, variant "wgmma", the routing given, every launch run by the harness (launch l of the
    test with seed l: a second call runs other CTA and thread orders)."""
    return _emulated_backward(harness, tmp_path, monkeypatch, poisoned_empty)


@pytest.fixture(params=list(BWD_OPTION_SETS))
def emulated_backward_options(request, tmp_path, monkeypatch, poisoned_empty):
    """``emulated_backward`` with the main kernel built with one of BWD_OPTION_SETS."""
    built = request.getfixturevalue(f"harness_{request.param}")
    return _emulated_backward(built, tmp_path, monkeypatch, poisoned_empty)


def _inputs(batch, seqlen, heads, kv_heads, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, seqlen, h, DIM, generator=g).to(dtype) for h in (heads, kv_heads, kv_heads, heads)]


def _check_launched(launched, dtype, deterministic):
    """The wgmma main kernel ran (no mma.sync one), in the segments' longest-first order (pairs.cu), with the slot
    merge exactly in the deterministic mode, and with no row-record launch (it builds its records itself)."""
    tag = "bf16" if dtype == torch.bfloat16 else "f16"
    assert any(n.startswith(f"moba_bwd_wg_{tag}_d{DIM}") for n in launched), launched
    assert not any(n.startswith((f"moba_bwd_{tag}_d", f"moba_bwd_blk_{tag}_d")) for n in launched), launched
    assert "moba_bwd_rows" not in launched, launched
    assert "moba_pairs_longest_first" in launched
    assert any(n.startswith("moba_bwd_dq_merge") for n in launched) == deterministic


CASES = [
    # dtype, block, causal, seqlen, top_k, heads, kv_heads, deterministic
    (torch.bfloat16, 128, True, 300, 2, 2, 1, False),   # N % B != 0 (the last block's keys masked), GQA 2
    (torch.float16, 256, False, 400, 2, 2, 2, True),    # two 128-key sub-tiles (the last block's second: 16 keys)
    (torch.bfloat16, 128, True, 100, 3, 2, 1, True),    # N < B, k >= n blocks, deterministic dQ (slot partials)
    (torch.float16, 128, False, 260, 2, 4, 1, False),   # GQA 4: rows of four query heads in a tile; 4-key last block
    (torch.bfloat16, 256, True, 300, 2, 1, 1, False),   # causal B 256: a sub-tile's keys past the row's own masked
]


def _id(c) -> str:
    dtype, block, causal, n, k, h, hk, det = c
    return (f"{str(dtype)[6:]}-B{block}-{'causal' if causal else 'full'}-N{n}-k{k}-h{h}/{hk}"
            f"{'-det' if det else '-atomic'}")


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_emulated_wgmma_gradients_match_oracle(emulated_backward, case):
    """Each gradient within the criterion; deterministic: a second run (other CTA and thread orders) bit-identical."""
    _check_case(emulated_backward, case)


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_emulated_wgmma_build_options_match_oracle(emulated_backward_options, emulated_backward, case):
    """The same with the main kernel's build options set (BWD_OPTION_SETS); deterministic: bit-identical to the default
    build (the options move work, not arithmetic)."""
    grads = _check_case(emulated_backward_options, case)
    if case[-1]:
        default = _check_case(emulated_backward, case, again=False)
        for name, a, b in zip("qkv", grads, default, strict=True):
            assert torch.equal(a, b), f"{_id(case)}: d{name} differs from the default build's"


def _case_args(case):
    dtype, block, causal, seqlen, top_k, heads, kv_heads, det = case
    q, k, v, dout = _inputs(1, seqlen, heads, kv_heads, dtype, seed=seqlen + block)
    topk = reference.moba_topk(q, k, block, top_k, causal=causal)
    out, lse = reference.moba_attention_given_routing(q.float(), k.float(), v.float(), topk, block, causal=causal)
    return dout, q, k, v, out.to(dtype), lse, topk, block, top_k, causal, det


def _check_case(emulated_backward, case, again=True):
    dtype, block, causal, seqlen, top_k, heads, kv_heads, det = case
    args = _case_args(case)
    dout, q, k, v, _, _, topk = args[:7]
    grads, launched = emulated_backward(*args)
    _check_launched(launched, dtype, det)
    check_grads(grads, q, k, v, dout, topk, block, causal, _id(case))
    if det and again:
        second, _ = emulated_backward(*args)
        for name, a, b in zip("qkv", grads, second, strict=True):
            assert torch.equal(a, b), f"{_id(case)}: d{name} differs between two deterministic runs"
    return grads


@pytest.mark.parametrize("accumulator, dtype, dq16", [("auto", torch.bfloat16, True), ("fp32", torch.bfloat16, False),
                                                    ("auto", torch.float16, False), ("input", torch.float16, True)])
def test_emulated_wgmma_dq_accumulators(emulated_backward, monkeypatch, accumulator, dtype, dq16):
    """The atomic dQ into a dQ of the input type (the _dq16 kernels: 16-bit staged rows, 16-bit bulk reductions, each
    sum rounded) and into the fp32 accumulator, each as chosen by $MOBALAB_BWD_DQ_ACC: within the criterion."""
    monkeypatch.setenv(CB.DQ_ACCUMULATOR_ENV, accumulator)
    case = (dtype, 128, True, 300, 2, 2, 1, False)
    args = _case_args(case)
    grads, launched = emulated_backward(*args)
    dout, q, k, v, _, _, topk, block, _, causal, _ = args
    check_grads(grads, q, k, v, dout, topk, block, causal, f"{accumulator} {_id(case)}")
    tag = "bf16" if dtype == torch.bfloat16 else "f16"
    main = [n for n in launched if n.startswith("moba_bwd_wg_")]
    assert main and set(main) == {f"moba_bwd_wg_{tag}_d{DIM}" + ("_dq16" if dq16 else "")}, launched


def test_emulated_wgmma_chunks_that_split_the_query_range(emulated_backward):
    """A scratch budget that splits each sequence's queries over several chunks (three of about 67 queries per
    sequence, batch 2): dK and dV of the wgmma kernel accumulate in fp32 over the chunks (stored by the first chunk of
    a sequence, dkv_mode 1, added by the later ones, 2) before their conversion."""
    dtype, block, top_k, causal, batch, seqlen, heads, kv_heads = torch.bfloat16, 128, 2, True, 2, 200, 2, 1
    q, k, v, dout = _inputs(batch, seqlen, heads, kv_heads, dtype, seed=7)
    topk = reference.moba_topk(q, k, block, top_k, causal=causal)
    out, lse = reference.moba_attention_given_routing(q.float(), k.float(), v.float(), topk, block, causal=causal)
    budget = 70 * (heads // kv_heads) * top_k * CB.bwd_bytes_per_pair(DIM, False)  # about 70 queries per chunk
    chunks = CB.bwd_plan(batch, seqlen, heads, kv_heads, DIM, top_k, False, budget)
    assert {CB.dkv_mode(c, seqlen) for c in chunks} == {1, 2} and len(chunks) > batch
    grads, launched = emulated_backward(dout, q, k, v, out.to(dtype), lse, topk, block, top_k, causal, budget=budget)
    _check_launched(launched, dtype, False)
    check_grads(grads, q, k, v, dout, topk, block, causal, "chunked")
