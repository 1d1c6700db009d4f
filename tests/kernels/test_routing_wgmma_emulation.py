"""The wgmma top-k kernel (cuda/topk_wgmma.cu) run on the host: its logic against the torch reference, no GPU.

``host_emulation/topk_wgmma_harness.cpp`` runs the kernel text as NVRTC sees it, with every CUDA thread a
coroutine (cuda_host.h: switches at barriers in shuffled orders, cp.async landing only when its thread waits,
poisoned shared memory, AddressSanitizer) and wgmma modelled by ``wgmma_host_model.h``: an MMA reads its
128-byte-swizzled operands through the descriptor, as the hardware does, only when its warpgroup waits for it, so
a centroid buffer refilled while its MMA is pending, a wrong descriptor or a wrong accumulator mapping gives wrong
selections. The launch is exactly what ``_cuda_routing.topk_launch(..., variant="wgmma")`` plans (grid, threads,
shared-memory size, argument tuple checked against the signature). What this cannot show (PTX, the async-proxy
fences, speed) is left to the GPU tests (tests/kernels/test_routing_gpu.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from mobalab.kernels import _cuda_routing as routing
from mobalab.kernels._build import source

sys.path.insert(0, str(Path(__file__).parent))
from _emulation import NEEDS_CXX, harness_fixture  # noqa: E402
from _topk_emulation import (  # noqa: E402
    case_id,
    check_fold,
    check_input_ignores_lo,
    check_input_is_rounded_fp32,
    check_planted_monotone,
    check_planted_ties,
    check_query_offset,
    check_random_case,
    host_files,
    run_random_case,
)

pytestmark = NEEDS_CXX


def _kernel_files() -> dict[str, str]:
    marker = "// ---- end wgmma.cuh ----"
    text = source(routing.WGMMA_SOURCE)
    assert text.count(marker) == 1
    text = text.replace(marker, marker + '\n#include "wgmma_host_model.h"')
    return {"topk_wgmma_kernels.cu": text, **host_files()}


harness = harness_fixture("topk_wgmma_harness", _kernel_files, flags=("-Wno-unknown-pragmas",))
# the kernel with its build options (routing.WGMMA_BUILD_OPTIONS: each descriptor built from its address)
harness_unstepped = harness_fixture("topk_wgmma_harness", _kernel_files, name="harness_unstepped",
                                    flags=("-Wno-unknown-pragmas", *(f"-D{o}" for o in routing.WGMMA_BUILD_OPTIONS)))
# the build for centroid_precision "input", scoring with the hi halves alone (no lo copies, one m64n64k16 a step)
harness_input = harness_fixture("topk_wgmma_harness", _kernel_files, name="harness_input",
                                flags=("-Wno-unknown-pragmas", f"-D{routing.INPUT_CENTROIDS_DEFINE}"))


CASES = [
    # dtype, dim, block, causal, seqlen, top_k, heads, kv_heads, batch
    (torch.bfloat16, 128, 16, True, 2100, 8, 1, 1, 1),    # 131 blocks: three chunks, the whole pipeline, 9 tiles
    (torch.float16, 64, 16, False, 1100, 16, 2, 2, 1),    # 69 blocks: two chunks, ragged last chunk and tile, MHA
    (torch.bfloat16, 64, 32, True, 700, 17, 4, 1, 1),     # tier 16 causal, GQA 4, rows past seqlen
    (torch.float16, 128, 64, True, 100, 8, 2, 1, 2),      # k >= n blocks, a single partial tile
    (torch.bfloat16, 64, 128, False, 90, 1, 2, 1, 1),     # N < B: one block, top-1
]


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_emulated_wgmma_topk_matches_reference(harness, tmp_path, case):
    check_random_case(harness, tmp_path, case, "wgmma")


@pytest.mark.parametrize("case", CASES[:2], ids=[case_id(c) for c in CASES[:2]])
def test_emulated_wgmma_topk_build_option_selects_the_same(harness, harness_unstepped, tmp_path, case):
    """With its build options (descriptors built from their addresses, not stepped) the kernel selects exactly what
    the default build does."""
    assert torch.equal(check_random_case(harness_unstepped, tmp_path, case, "wgmma"),
                       run_random_case(harness, tmp_path, case, "wgmma")[0])


@pytest.mark.parametrize("causal", [True, False])
def test_emulated_wgmma_exact_ties_go_to_the_higher_block(harness, tmp_path, causal):
    """Planted scores, exact in every precision: centroids alpha_j u with few distinct alpha_j (many exact
    ties), queries +-u; the selections must equal the reference's exactly (ties to the higher block index)."""
    check_planted_ties(harness, tmp_path, causal, "wgmma", (12,) if causal else (3,))


@pytest.mark.parametrize("causal", [True, False])
def test_emulated_wgmma_topk_with_monotone_scores(harness, tmp_path, causal):
    """Distinct exact scores rising (even rows) or falling (odd rows) along the scan: every offer enters the list,
    or none after the first; a row's first word filtered against its own bound must keep its best scores."""
    check_planted_monotone(harness, tmp_path, causal, "wgmma", (8, 17) if causal else (3, 16), rows=300)


@pytest.mark.parametrize("causal", [True, False])
def test_emulated_wgmma_topk_at_a_query_offset(harness, tmp_path, causal):
    """Rows of q starting at position 1000 (inside block 62 of 16 keys) over the whole sequence's centroids:
    the whole sequence's routing at those positions (a context-parallel shard's call)."""
    check_query_offset(harness, tmp_path, causal, "wgmma")


@pytest.mark.parametrize("causal", [True, False])
def test_emulated_wgmma_topk_numbers_a_folded_batch(harness, tmp_path, causal):
    """fold_blocks = n writes block j of sequence b as b n + j (-1 kept), as renumbering the plain selections."""
    check_fold(harness, tmp_path, "wgmma", 16 if not causal else 8, causal)


@pytest.mark.parametrize("case", CASES[:3], ids=[case_id(c) for c in CASES[:3]])
def test_emulated_wgmma_input_centroids_score_the_rounded_centroids(harness, harness_input, tmp_path, case):
    """centroid_precision "input": the reference's selections in that precision (up to near-ties), and exactly the
    default build's from centroids rounded to q's dtype; the lo halves (poisoned) are never read."""
    check_input_is_rounded_fp32(harness_input, harness, tmp_path, case, "wgmma")


@pytest.mark.parametrize("causal", [True, False])
def test_emulated_wgmma_input_centroids_ignore_lo(harness, harness_input, tmp_path, causal):
    check_input_ignores_lo(harness_input, harness, tmp_path, "wgmma", causal)
