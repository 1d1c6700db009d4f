"""The mma.sync top-k kernels (cuda/topk.cu: router variants "mma" and "split") run on the host: their logic against
the torch reference, no GPU.

``host_emulation/topk_mma_harness.cpp`` runs the kernel text as NVRTC sees it, with every CUDA thread a coroutine
(cuda_host.h: switches at barriers in shuffled orders, cp.async landing only when its thread waits, poisoned shared
memory, AddressSanitizer); ldmatrix.x4 and mma.sync m16n8k16 are modelled warp-wide from the PTX ISA fragment
layouts, and the shared-memory swizzle is ptx.cuh's own MOBA_SWZ_COL. The launch is exactly what
``_cuda_routing.topk_launch`` plans (grid, threads, shared-memory size, argument tuple checked against the
signature). The split kernel must select exactly what the mma kernel selects (the same scores; its scan only
skips pairs that cannot be selected). What this cannot show (PTX, register allocation, speed) is left to the GPU
tests (tests/kernels/test_routing_gpu.py) and the compile tests.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from mobalab.kernels import _cuda_routing as routing
from mobalab.kernels import reference
from mobalab.kernels._build import source
from mobalab.kernels._launch import signatures

sys.path.insert(0, str(Path(__file__).parent))
from _emulation import NEEDS_CXX, harness_fixture  # noqa: E402
from _topk_emulation import (  # noqa: E402
    case_id,
    check_fold,
    check_input_ignores_lo,
    check_input_is_rounded_fp32,
    check_near_ties,
    check_planted_monotone,
    check_planted_ties,
    check_query_offset,
    check_random_case,
    host_files,
    run_random_case,
    run_topk,
)

pytestmark = NEEDS_CXX
ROUTERS = ("mma", "split")


def _kernel_files() -> dict[str, str]:
    table = "".join(f"K({name}, {'__nv_bfloat16' if '_bf16_' in name else '__half'})\n"
                    for name in signatures("topk.cu"))
    return {"topk_kernels.cu": source("topk.cu"), "topk_kernel_table.inc": table, **host_files()}


harness = harness_fixture("topk_mma_harness", _kernel_files, flags=("-Wno-unknown-pragmas",))
# the build for centroid_precision "input": the scores q.hi alone, no lo tiles copied
harness_input = harness_fixture("topk_mma_harness", _kernel_files, name="harness_input",
                                flags=("-Wno-unknown-pragmas", f"-D{routing.INPUT_CENTROIDS_DEFINE}"))


CASES = [
    # dtype, dim, block, causal, seqlen, top_k, heads, kv_heads, batch
    (torch.bfloat16, 128, 16, True, 1100, 8, 2, 1, 1),    # 69 blocks: two centroid tiles (threshold exchange), GQA 2
    (torch.float16, 64, 16, False, 1100, 16, 2, 2, 1),    # non-causal, tier 16, ragged last tile and query tile
    (torch.bfloat16, 32, 32, True, 700, 17, 2, 1, 1),     # tier 16 causal at its top, head dim 32, N % B != 0
    (torch.float16, 96, 64, True, 100, 8, 2, 1, 2),       # k >= n blocks, a single partial tile, head dim 96
    (torch.bfloat16, 256, 128, False, 90, 1, 2, 1, 1),    # N < B: one block, top-1, head dim 256
    (torch.bfloat16, 64, 16, False, 300, 2, 1, 1, 1),     # top-2 non-causal
]
IDS = [case_id(c) for c in CASES]


@pytest.fixture(scope="module")
def mma_outputs() -> dict:
    """The mma kernel's selections per case, kept from its own test so that the split case need not run it again."""
    return {}


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_emulated_topk_matches_reference(harness, tmp_path, mma_outputs, case, router):
    """The reference's selections up to near-ties; the split kernel's exactly the mma kernel's."""
    out = check_random_case(harness, tmp_path, case, router)
    key = case_id(case)
    if router == "mma":
        mma_outputs[key] = out
        return
    if key not in mma_outputs:  # the split case run on its own
        mma_outputs[key] = run_random_case(harness, tmp_path, case, "mma")[0]
    assert torch.equal(out, mma_outputs[key]), "split and mma select differently"


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("causal", [True, False])
def test_emulated_exact_ties_go_to_the_higher_block(harness, tmp_path, causal, router):
    """Planted scores, exact in every precision: centroids alpha_j u with few distinct alpha_j (many exact ties, also
    across the two halves of the split kernel's tiles), queries +-u; the selections must equal the reference's
    exactly (ties to the higher block index)."""
    # the last rows only (a query offset): every one sees three centroid tiles
    check_planted_ties(harness, tmp_path, causal, router, (12, 17) if causal else (3, 16), rows=200)


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("causal", [True, False])
def test_emulated_topk_with_monotone_scores(harness, tmp_path, causal, router):
    """Distinct exact scores rising (even rows) or falling (odd rows) along the scan: every offer enters the list,
    or none after the first; a row's first word filtered against its own bound must keep its best scores."""
    check_planted_monotone(harness, tmp_path, causal, router, (8, 17) if causal else (3, 16), rows=200)


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("causal", [True, False])
def test_emulated_topk_at_a_query_offset(harness, tmp_path, causal, router):
    """Rows of q starting at position 1000 (inside block 62 of 16 keys) over the whole sequence's centroids:
    the whole sequence's routing at those positions (a context-parallel shard's call)."""
    check_query_offset(harness, tmp_path, causal, router)


def test_emulated_heap_tier(harness, tmp_path):
    """The shared-memory heap lists (top_k 40, mma only: the split kernel has register lists only)."""
    gen = torch.Generator().manual_seed(12)
    q = torch.randn((1, 600, 2, 64), generator=gen).to(torch.float16)
    k = torch.randn((1, 600, 1, 64), generator=gen).to(torch.float16)
    cent = reference.moba_centroids(k, 16)
    for causal in (True, False):
        out = run_topk(harness, tmp_path, q, cent, 16, 40, causal, "mma", seed=5)
        check_near_ties(out, reference.moba_topk(q, k, 16, 40, causal=causal), q, cent, causal)


@pytest.mark.parametrize(("router", "top_k", "causal"), [("mma", 8, True), ("split", 16, False), ("mma", 40, True)])
def test_emulated_topk_numbers_a_folded_batch(harness, tmp_path, router, top_k, causal):
    """fold_blocks = n writes block j of sequence b as b n + j (-1 kept), in the register lists of both kernels and
    the heap tier, exactly what renumbering the plain selections gives."""
    check_fold(harness, tmp_path, router, top_k, causal)


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("case", CASES[:3], ids=IDS[:3])
def test_emulated_input_centroids_score_the_rounded_centroids(harness, harness_input, tmp_path, case, router):
    """centroid_precision "input": the reference's selections in that precision (up to near-ties), and exactly the
    default build's from centroids rounded to q's dtype; the lo halves (poisoned) are never read."""
    check_input_is_rounded_fp32(harness_input, harness, tmp_path, case, router)


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("causal", [True, False])
def test_emulated_input_centroids_ignore_lo(harness, harness_input, tmp_path, causal, router):
    check_input_ignores_lo(harness_input, harness, tmp_path, router, causal)


def test_emulated_heap_tier_input_centroids(harness_input, tmp_path):
    """The heap tier (top_k 40) with centroid_precision "input"."""
    gen = torch.Generator().manual_seed(12)
    q = torch.randn((1, 600, 2, 64), generator=gen).to(torch.float16)
    k = torch.randn((1, 600, 1, 64), generator=gen).to(torch.float16)
    cent = reference.moba_centroids(k, 16)
    out = run_topk(harness_input, tmp_path, q, cent, 16, 40, True, "mma", seed=5, centroid_precision="input")
    ref = reference.moba_topk(q, k, 16, 40, causal=True, centroid_precision="input")
    check_near_ties(out, ref, q, cent.to(torch.float16).float(), True)
