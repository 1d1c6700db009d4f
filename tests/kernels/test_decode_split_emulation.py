"""The two-launch decode kernels (cuda/decode_split.cu) run on the host: their logic against the torch
reference, no GPU.

``host_emulation/cuda_host.h`` runs every CUDA thread as a coroutine (switching at __syncthreads and the warp
operations, in shuffled orders), completes every cp.async only when its thread waits for it, and runs the
CTAs of a grid one after another in a shuffled order, so any CTA can be the last of its group (the one that
merges). The harness executes exactly the launches ``_cuda_decode_split.split_launches`` plans for a cache on
the CPU (grid, shared-memory size, arguments checked against the kernel signatures), compiled with
AddressSanitizer: an access beyond a buffer or beyond the planned shared memory fails the run; every output
and scratch buffer is poisoned first. What this cannot show (PTX, the memory model between concurrent CTAs,
speed) is left to the GPU tests.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from mobalab.kernels import _cuda_decode_split as S
from mobalab.kernels import _decode as D
from mobalab.kernels._build import source

sys.path.insert(0, str(Path(__file__).parent))
from _decode_cases import assert_step_matches_reference, decode_case  # noqa: E402
from _emulation import NEEDS_CXX, harness_fixture, poison, run_emulated  # noqa: E402

pytestmark = NEEDS_CXX


harness = harness_fixture("decode_split_harness", lambda: {"decode_split_kernels.cu": source("decode_split.cu")})


BF, FP = torch.bfloat16, torch.float16
CASES = [
    # dtype, d, B, kv_heads, heads, q_len, prompt lengths, top_k, merge entries, options
    pytest.param(BF, 128, 16, 2, 8, 1, [1500, 333], 8, 512, {}, id="bf16-d128-B16-gqa4-ragged-ranges"),
    pytest.param(FP, 64, 16, 1, 2, 2, [4500, 100], 4, 6, {}, id="fp16-d64-B16-qlen2-tiles-per-range"),
    pytest.param(FP, 128, 128, 1, 2, 3, [520, 390], 3, 512, {}, id="fp16-d128-B128-qlen3-chunks"),
    pytest.param(BF, 64, 32, 1, 16, 5, [300], 4, 512, {}, id="bf16-d64-B32-two-row-groups"),
    pytest.param(BF, 128, 16, 2, 2, 2, [40, 17], 1, 512, {}, id="bf16-top1-own-only"),
    pytest.param(FP, 64, 64, 1, 1, 16, [150], 32, 512, {}, id="fp16-qlen16-topk32-fewer-blocks"),
    pytest.param(BF, 64, 16, 1, 2, 1, [1400], 16, 30, dict(ties=True), id="bf16-exact-ties-across-ranges"),
    pytest.param(BF, 128, 64, 1, 8, 1, [3000], 4, 512, dict(shared=True), id="bf16-B64-shared-selection"),
    pytest.param(FP, 128, 16, 2, 6, 7, [5, 1300, 260], 5, 512, {}, id="fp16-gqa3-qlen7-tiny-seq"),
    # 600 candidates of d 64 in one range of five 128-block tiles: both register buffers reloaded (pipeline)
    pytest.param(BF, 64, 16, 1, 2, 1, [9620, 2100], 4, 3, {}, id="bf16-d64-five-tiles-one-range"),
]
_ARGS = ("dtype", "dim", "block", "kv_heads", "heads", "q_len", "lengths", "top_k", "merge", "opts")


def _run_case(harness, tmp_path, dtype, dim, block, kv_heads, heads, q_len, lengths, top_k, merge, opts, seed=7,
              route_only=False):
    cache, q = decode_case(dim + block + heads + q_len, dtype, dim, block, kv_heads, heads, q_len, lengths, **opts)
    top_k, scale = D.check_decode(q, cache, top_k, kernel_limits=True)
    plan, bufs, launches = S.split_launches(q, cache, top_k, scale, route_only=route_only, merge_entries=merge)
    poison(bufs)
    run_emulated(harness, tmp_path, launches, seed=seed)
    return cache, q, top_k, scale, plan, bufs


@pytest.mark.parametrize(_ARGS, CASES)
def test_emulated_split_kernels_match_reference(harness, tmp_path, dtype, dim, block, kv_heads, heads, q_len,
                                                lengths, top_k, merge, opts):
    cache, q, top_k, scale, plan, bufs = _run_case(harness, tmp_path, dtype, dim, block, kv_heads, heads, q_len,
                                                   lengths, top_k, merge, opts)
    assert_step_matches_reference(q, cache, top_k, scale, bufs, block=block, lengths=lengths,
                                  ties=opts.get("ties", False))


def test_other_cta_orders_give_the_same_step(harness, tmp_path):
    """Other random orders of the CTAs (and of the threads): bit-identical outputs."""
    runs = [_run_case(harness, tmp_path, *CASES[1].values, seed=s) for s in (1, 2)]
    assert runs[0][4].n_range > 1 and runs[0][4].tiles_per_range > 1
    for name in ("sel", "out", "lse"):
        assert torch.equal(runs[0][-1][name], runs[1][-1][name]), name


def test_route_only_launch_writes_the_selection_alone(harness, tmp_path):
    cache, q, top_k, _, plan, bufs = _run_case(harness, tmp_path, *CASES[0].values, route_only=True)
    assert plan.n_range > 1
    assert torch.equal(bufs["sel"], D._route(q, cache, top_k))
    assert torch.isnan(bufs["lse"]).all()  # no attention ran
    assert int(cache._counters.abs().sum()) == 0


def test_cases_cover_the_kernel_paths():
    """The cases reach several ranges, several tiles per range, row groups, chunks, top_k = 1, fewer
    candidates than top_k - 1, and blocks shared by several rows."""
    seen = set()
    for p in CASES:
        dtype, dim, block, kv_heads, heads, q_len, lengths, top_k, merge, opts = p.values
        plan = S.plan_split(len(lengths), q_len, heads, kv_heads, dim, block, top_k, max(lengths) + q_len,
                            1, 1, merge_entries=merge)
        seen |= {"ranges"} if plan.n_range > 1 else set()
        seen |= {"tiles"} if plan.tiles_per_range > 1 else set()
        seen |= {"pipeline"} if plan.tiles_per_range > 2 else set()
        seen |= {"row groups"} if plan.n_rg > 1 else set()
        seen |= {"chunks"} if plan.n_chunks > 1 else set()
        seen |= {"own only"} if top_k == 1 else set()
        seen |= {"short"} if top_k - 1 > (min(lengths) + q_len - 1) // block else set()
        seen |= {"shared"} if opts.get("shared") or q_len > 1 else set()
    assert seen == {"ranges", "tiles", "row groups", "chunks", "own only", "short", "shared", "pipeline"}
