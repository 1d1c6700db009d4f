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
# the kernel with the build options that keep its scores (routing.WGMMA_BUILD_OPTIONS: each descriptor built from
# its address; both warpgroups issuing before they scan)
RS_OPTION = "MOBA_TOPK_WG_RS=1"
harness_unstepped = harness_fixture("topk_wgmma_harness", _kernel_files, name="harness_unstepped",
                                    flags=("-Wno-unknown-pragmas", *(f"-D{o}" for o in routing.WGMMA_BUILD_OPTIONS
                                                                    if o not in (RS_OPTION, routing.WG4_OPTION))))

# Q from registers (MOBA_TOPK_WG_RS=1: q.hi and q.lo summed into one m64n64 accumulator per half)
assert RS_OPTION in routing.WGMMA_BUILD_OPTIONS
harness_rs = harness_fixture("topk_wgmma_harness", _kernel_files, name="harness_rs",
                             flags=("-Wno-unknown-pragmas", f"-D{RS_OPTION}"))
# four warpgroups (list tier 8; tier 16 keeps the two-warpgroup body): launches planned with the option
WG4 = (routing.WG4_OPTION,)
harness_wg4 = harness_fixture("topk_wgmma_harness", _kernel_files, name="harness_wg4",
                              flags=("-Wno-unknown-pragmas", *(f"-D{o}" for o in WG4)))


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
    """With the build options that keep its scores (descriptors built from their addresses, not stepped; no stagger)
    the kernel selects exactly what the default build does."""
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


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_emulated_wgmma_topk_q_in_registers_matches_reference(harness_rs, tmp_path, case):
    """Q as register A fragments, q.hi and q.lo summed by the MMAs: the reference's selections (near-ties aside)."""
    check_random_case(harness_rs, tmp_path, case, "wgmma")


@pytest.mark.parametrize("causal", [True, False])
def test_emulated_wgmma_topk_q_in_registers_exact_ties(harness_rs, tmp_path, causal):
    """Planted exact ties with Q from registers: the reference's selections exactly (ties to the higher block)."""
    check_planted_ties(harness_rs, tmp_path, causal, "wgmma", (12,) if causal else (3,))


WG4_CASES = CASES + [
    (torch.float16, 128, 16, False, 1500, 8, 2, 2, 1),    # non-causal tier 8: two chunks, every word a candidate word
    (torch.bfloat16, 64, 16, True, 2100, 5, 4, 2, 1),     # d 64 tier 8, GQA 2, three chunks
]


@pytest.mark.parametrize("case", WG4_CASES, ids=[case_id(c) for c in WG4_CASES])
def test_emulated_wgmma_topk_four_warpgroups_matches_reference(harness_wg4, tmp_path, case):
    """Four warpgroups, each row scanned by two threads whose lists exchange thresholds every chunk and merge at the
    end: the reference's selections (near-ties aside); tier-16 cases run the two-warpgroup body of the same build."""
    check_random_case(harness_wg4, tmp_path, case, "wgmma", WG4)


@pytest.mark.parametrize("causal", [True, False])
def test_emulated_wgmma_topk_four_warpgroups_exact_ties(harness_wg4, tmp_path, causal):
    """Planted exact ties through the split lists and their merge: ties to the higher block, as the reference."""
    check_planted_ties(harness_wg4, tmp_path, causal, "wgmma", (8, 2) if causal else (3, 8), defines=WG4)


@pytest.mark.parametrize("causal", [True, False])
def test_emulated_wgmma_topk_four_warpgroups_monotone_scores(harness_wg4, tmp_path, causal):
    """Scores rising or falling along the scan: the lighter word bound and the other list's threshold must keep the
    best scores."""
    check_planted_monotone(harness_wg4, tmp_path, causal, "wgmma", (8, 5) if causal else (3, 8), rows=300,
                           defines=WG4)


@pytest.mark.parametrize("causal", [True, False])
def test_emulated_wgmma_topk_four_warpgroups_at_a_query_offset_and_folded(harness_wg4, tmp_path, causal):
    """A context-parallel shard's rows (query offset 1000) and (causal: rows with unused slots) a folded batch's
    numbering, through both lists."""
    check_query_offset(harness_wg4, tmp_path, causal, "wgmma", WG4)
    if causal:  # non-causal tier 8 leaves no slot unused at the fold's 13 blocks
        check_fold(harness_wg4, tmp_path, "wgmma", 8, causal, WG4)


def test_four_warpgroups_plan_their_launch():
    """The option's tier-8 launches take 512 threads and their own shared memory; tier 16 keeps the default's."""
    q = torch.zeros((1, 1000, 2, 128), dtype=torch.bfloat16)
    hi = torch.zeros((1, 2, 63, 128), dtype=torch.bfloat16)
    out = torch.zeros((1, 1000, 2, 8), dtype=torch.int32)
    p8 = routing.topk_launch(q, hi, hi, out, 16, 8, True, variant="wgmma", defines=WG4)
    assert p8.block == (routing.WG4_THREADS, 1, 1) and p8.shared_mem == routing.wgmma4_topk_shared_bytes(128)
    out16 = torch.zeros((1, 1000, 2, 16), dtype=torch.int32)
    p16 = routing.topk_launch(q, hi, hi, out16, 16, 16, True, variant="wgmma", defines=WG4)
    assert p16.block == (routing.WG_THREADS, 1, 1) and p16.shared_mem == routing.wgmma_topk_shared_bytes(128)
