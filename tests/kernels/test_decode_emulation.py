"""The CUDA decode kernel (cuda/decode.cu) run on the host: its logic against the torch reference, no GPU.

``host_emulation/cuda_host.h`` runs every CUDA thread as a coroutine (switching at __syncthreads and at
the warp operations, in shuffled orders), completes every cp.async only when its thread waits for it (the
destination reads as NaN until then), and hands out the step's work tickets in a random order within the
routing and within the attention items, so any item can be the last of its group. The harness executes
exactly the launch that ``_cuda_decode.step_launches`` plans for a cache on the CPU: grid, shared-memory
size and argument tuple as the GPU would get them (checked against the kernel signature). It is compiled
with AddressSanitizer, so any access beyond a buffer or beyond the planned shared memory fails the run;
every output and scratch buffer is poisoned first. What this cannot show (PTX, the memory model between
concurrent CTAs, speed) is left to the GPU tests.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from mobalab.kernels import MobaKVCache
from mobalab.kernels import _cuda_decode as C
from mobalab.kernels import _decode as D
from mobalab.kernels._build import source

sys.path.insert(0, str(Path(__file__).parent))
from _decode_cases import assert_step_matches_reference, decode_case  # noqa: E402
from _emulation import NEEDS_CXX, harness_fixture, poison, run_emulated  # noqa: E402

pytestmark = NEEDS_CXX


harness = harness_fixture("decode_harness", lambda: {"decode_kernels.cu": source("decode.cu")})


BF, FP = torch.bfloat16, torch.float16
CASES = [
    # dtype, d, B, kv_heads, heads, q_len, prompt lengths, appends, top_k, sm_count, window words, options
    pytest.param(BF, 64, 16, 2, 8, 1, [700, 333], 1, 8, 132, 1024, {}, id="bf16-d64-B16-gqa4-ragged-units"),
    pytest.param(BF, 128, 16, 1, 2, 2, [2100, 1500], 1, 16, 1, 1024, {}, id="bf16-d128-B16-one-split-tiles"),
    pytest.param(FP, 128, 128, 1, 2, 3, [520, 390], 2, 3, 132, 1024, {}, id="fp16-d128-B128-qlen3-chunks"),
    pytest.param(BF, 64, 32, 1, 16, 5, [300], 1, 4, 8, 1024, {}, id="bf16-d64-B32-two-row-groups"),
    pytest.param(BF, 128, 16, 2, 2, 2, [40, 17], 1, 1, 132, 1024, {}, id="bf16-top1-own-only"),
    pytest.param(FP, 64, 64, 1, 1, 16, [150], 1, 32, 132, 1024, {}, id="fp16-qlen16-topk32-fewer-blocks"),
    pytest.param(BF, 64, 16, 1, 2, 1, [1400], 1, 16, 4, 1024, dict(ties=True), id="bf16-exact-ties"),
    pytest.param(BF, 128, 32, 2, 8, 1, [8500, 3000], 1, 16, 4, 2, {}, id="bf16-B32-k16-splits-tiles-windows"),
    pytest.param(FP, 128, 128, 2, 8, 1, [6000], 1, 8, 132, 1024, {}, id="fp16-B128-k8-batch1-many-units"),
    pytest.param(BF, 64, 64, 1, 2, 1, [20 + 7 * i for i in range(64)], 1, 4, 32, 1024, {},
                 id="bf16-B64-k4-batch64"),
    pytest.param(BF, 128, 128, 1, 8, 1, [3000], 1, 4, 16, 1024, dict(shared=True),
                 id="bf16-B128-k4-shared-selection-empty-units"),
    # rows scored DEC_ROUTE_ILP at a time: 21 rows (five groups of four and one left over), group 3, a
    # sequence shorter than one block next to ones with more tiles than routing stages, top_k above the blocks
    pytest.param(FP, 128, 16, 2, 6, 7, [5, 3300, 260], 1, 12, 1, 1024, {}, id="fp16-gqa3-qlen7-rows-ilp-tiny-seq"),
]
# splits, two attention units per kv head, union windows of 64 blocks: small enough to run three times
ORDER_CASE = (BF, 128, 16, 1, 4, 1, [4200, 1200], 1, 8, 4, 2, {})
_ARGS = ("dtype", "dim", "block", "kv_heads", "heads", "q_len", "lengths", "steps", "top_k", "sms", "win", "opts")


def _run_case(harness, tmp_path, dtype, dim, block, kv_heads, heads, q_len, lengths, steps, top_k, sms, win, opts,
              seed=7, route_only=False, centroid_precision="fp32"):
    cache, q = decode_case(dim + block + heads + q_len, dtype, dim, block, kv_heads, heads, q_len, lengths, steps,
                           **opts)
    top_k, scale = D.check_decode(q, cache, top_k, kernel_limits=True)
    plan, bufs, launches = C.step_launches(q, cache, top_k, scale, sm_count=sms, win_words=win,
                                           route_only=route_only, centroid_precision=centroid_precision)
    assert all(x.defines == ((C.INPUT_CENTROIDS_DEFINE,) if centroid_precision == "input" else ()) for x in launches)
    poison(bufs)
    run_emulated(harness, tmp_path, launches, seed=seed)
    return cache, q, top_k, scale, plan, bufs


@pytest.mark.parametrize(_ARGS, CASES)
def test_emulated_kernel_matches_reference(harness, tmp_path, dtype, dim, block, kv_heads, heads, q_len, lengths,
                                           steps, top_k, sms, win, opts):
    cache, q, top_k, scale, plan, bufs = _run_case(harness, tmp_path, dtype, dim, block, kv_heads, heads, q_len,
                                                   lengths, steps, top_k, sms, win, opts)
    assert_step_matches_reference(q, cache, top_k, scale, bufs, block=block, lengths=lengths,
                                  ties=opts.get("ties", False))


# centroid_precision "input": the kernel built with MOBA_DECODE_CENTROIDS_INPUT=1 ranks the candidates by
# q . T(S_j / B); keys of a mean of 2 and a spread of a few ulps there, so that the rounding changes many selections
harness_input = harness_fixture("decode_harness", lambda: {"decode_kernels.cu": source("decode.cu")},
                                flags=("-DMOBA_DECODE_CENTROIDS_INPUT=1",), name="harness_input")


@pytest.mark.parametrize(_ARGS, [
    pytest.param(BF, 128, 32, 2, 8, 1, [8500, 3000], 1, 16, 4, 2, dict(key_mean=2.0), id="bf16-B32-splits-windows"),
    pytest.param(FP, 64, 16, 1, 2, 2, [2100, 1500], 1, 8, 132, 1024, dict(key_mean=2.0), id="fp16-d64-qlen2"),
])
def test_emulated_input_centroid_routing_matches_reference(harness_input, tmp_path, dtype, dim, block, kv_heads,
                                                           heads, q_len, lengths, steps, top_k, sms, win, opts):
    cache, q, top_k, scale, plan, bufs = _run_case(harness_input, tmp_path, dtype, dim, block, kv_heads, heads,
                                                   q_len, lengths, steps, top_k, sms, win, opts,
                                                   centroid_precision="input")
    assert_step_matches_reference(q, cache, top_k, scale, bufs, block=block, lengths=lengths,
                                  centroid_precision="input")
    assert not torch.equal(bufs["sel"], D._route(q, cache, top_k))  # the fp32 routing selects otherwise


# One key element of block 2 infinite or NaN: the block's sum is not finite, so it scores NaN in either precision and
# no query selects it (as moba_topk and the reference do), whichever sign the queries give an infinite product.
@pytest.mark.parametrize("precision", ["fp32", "input"])
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
def test_a_block_with_a_non_finite_key_is_never_selected(request, tmp_path, value, precision):
    build = "harness" if precision == "fp32" else "harness_input"
    case = (BF, 64, 16, 1, 8, 1, [400, 250], 1, 4, 132, 1024, dict(poison_key=value))
    cache, q, top_k, scale, plan, bufs = _run_case(request.getfixturevalue(build), tmp_path, *case,
                                                   centroid_precision=precision)
    assert not (bufs["sel"][0] == 2).any(), "the block with a non-finite key was selected"
    assert_step_matches_reference(q, cache, top_k, scale, bufs, block=16, lengths=[400, 250],
                                  centroid_precision=precision)


def test_any_ticket_order_gives_the_same_step(harness, tmp_path):
    """Other random orders of the work items (and of the threads): bit-identical outputs, the reference's."""
    runs = [_run_case(harness, tmp_path, *ORDER_CASE, seed=s) for s in (1, 2, 3)]
    cache, q, top_k, scale, plan, bufs = runs[0]
    assert plan.n_split > 1 and plan.n_x > 1
    assert torch.equal(bufs["sel"], D._route(q, cache, top_k))
    torch.testing.assert_close(bufs["out"].float(), D._attend(q, cache, bufs["sel"], scale)[0].float(),
                               atol=2**-7, rtol=2**-7)
    for other in runs[1:]:
        for name in ("sel", "out", "lse"):
            assert torch.equal(other[-1][name], bufs[name]), name


def test_route_only_launch_writes_the_selection_alone(harness, tmp_path):
    cache, q, top_k, _, plan, bufs = _run_case(harness, tmp_path, *CASES[7].values, route_only=True)
    assert plan.n_split > 1
    assert torch.equal(bufs["sel"], D._route(q, cache, top_k))
    assert torch.isnan(bufs["lse"]).all()  # no attention ran
    assert int(cache._counters.abs().sum()) == 0


def test_plans_of_the_cases_cover_the_kernel_paths():
    """The emulated cases reach splits with several stages, row groups, chunks, union windows, units that
    span many blocks or get no item, top_k = 1 and fewer candidates than top_k - 1."""
    seen = set()
    for p in CASES:
        dtype, dim, block, kv_heads, heads, q_len, lengths, steps, top_k, sms, win, opts = p.values
        cache, q = decode_case(0, dtype, dim, block, kv_heads, heads, q_len, lengths, steps)
        plan = C.plan_decode(len(lengths), q_len, heads, kv_heads, dim, block, top_k, int(cache._len.max()),
                             cache.n_blocks, cache.capacity, sms, win)
        seen |= {"split"} if plan.n_split > 1 else set()
        seen |= {"tiles"} if plan.blocks_per_split > C.route_tile(dim) else set()
        seen |= {"split and tiles"} if plan.n_split > 1 and plan.blocks_per_split > C.route_tile(dim) else set()
        seen |= {"row groups"} if plan.n_rg > 1 else set()
        seen |= {"chunks"} if plan.n_chunks > 1 else set()
        seen |= {"windows"} if int(cache._len.max()) > block * 32 * win else set()
        seen |= {"wide units"} if plan.nb_max > C.attn_stages(dim) else set()
        seen |= {"empty units"} if opts.get("shared") and plan.n_x > (top_k + 1) * plan.n_chunks else set()
        seen |= {"own only"} if top_k == 1 else set()
        seen |= {"short"} if top_k - 1 > (int(cache._len.min()) - 1) // block else set()
        seen |= {"batch 1"} if len(lengths) == 1 and plan.n_x > 1 else set()
        seen |= {"batch 64"} if len(lengths) == 64 else set()
        seen |= {"rows left over"} if plan.rows_per_group % 4 and plan.rows_per_group > 4 else set()
        seen |= {"stages wrap"} if plan.blocks_per_split > C.ROUTE_STAGES * C.route_tile(dim) else set()
    assert seen == {"split", "tiles", "split and tiles", "row groups", "chunks", "windows", "wide units",
                    "empty units", "own only", "short", "batch 1", "batch 64", "rows left over", "stages wrap"}


def test_second_step_reuses_counters(harness, tmp_path):
    """Two decode steps in a row on one cache: the completion counters left by the first are zero."""
    cache, q = decode_case(3, torch.bfloat16, 64, 32, 1, 4, 1, [400, 250], 1)
    for step in range(2):
        if step:
            g = torch.Generator().manual_seed(11)
            cache.append(*(torch.randn(2, 1, 1, 64, generator=g).to(torch.bfloat16) for _ in range(2)))
        top_k, scale = D.check_decode(q, cache, 8, kernel_limits=True)
        _, bufs, launches = C.step_launches(q, cache, top_k, scale)
        poison(bufs)
        run_emulated(harness, tmp_path, launches, seed=step)
        ref_out, _ = D._attend(q, cache, D._route(q, cache, top_k), scale)
        torch.testing.assert_close(bufs["out"].float(), ref_out.float(), atol=2**-7, rtol=2**-7)
    assert math.isfinite(float(bufs["lse"].sum()))


# A step captured in a CUDA graph is planned for the cache's max_seqlen (its replays run at whatever lengths the cache
# has reached): such a plan, for sequences several times longer than those held, gives the step of the lengths held
# (routing splits and union windows beyond every sequence).
@pytest.mark.parametrize("case", [CASES[0].values, CASES[7].values, CASES[11].values],
                         ids=["gqa4-ragged-units", "B32-k16-splits-windows", "gqa3-qlen7-tiny-seq"])
def test_a_graph_plan_for_max_seqlen_serves_the_lengths_held(harness, tmp_path, monkeypatch, case):
    dtype, dim, block, kv_heads, heads, q_len, lengths, steps, top_k, sms, win, opts = case
    cache, q = decode_case(dim + block + heads + q_len, dtype, dim, block, kv_heads, heads, q_len, lengths, steps,
                           spare=3 * max(lengths), **opts)
    top_k, scale = D.check_decode(q, cache, top_k, kernel_limits=True)
    held = C.plan_decode(len(lengths), q_len, heads, kv_heads, dim, block, top_k, int(cache.lengths.max()),
                         cache.n_blocks, cache.capacity, sms, win)
    monkeypatch.setattr(MobaKVCache, "_capturing", lambda self: True)
    plan, bufs, launches = C.step_launches(q, cache, top_k, scale, sm_count=sms, win_words=win)
    assert plan == C.plan_decode(len(lengths), q_len, heads, kv_heads, dim, block, top_k, cache.max_seqlen,
                                 cache.n_blocks, cache.capacity, sms, win) != held
    poison(bufs)
    run_emulated(harness, tmp_path, launches, seed=3)
    assert_step_matches_reference(q, cache, top_k, scale, bufs, block=block, lengths=lengths)
