"""The certified wgmma router (cuda/topk_wgmma_cert.cu) run on the host: its selections against the torch reference,
no GPU.

``host_emulation/topk_wgmma_cert_harness.cpp`` runs the certified kernel and the exact kernel over its row list as
``_cuda_routing.certified_launches`` plans them, in the emulation of test_routing_wgmma_emulation.py (every CUDA
thread a coroutine, wgmma modelled from its descriptors, cp.async landing late, poisoned shared memory); the fp16
centroids and their norms come from ``_topk_emulation.c16_norms`` (centroids.cu's kernel for them is a GPU test's).
The selections must be the reference's up to near-ties, every row written once, whether the certificate decided it
or the row list did; cases where the certificate can decide nothing (fp16 overflow of q or of a centroid) and
planted scores (exact ties, scores within the error bound of each other) make the row list and the exact rescoring
do the work.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from mobalab.kernels import _cuda_routing as routing
from mobalab.kernels import reference
from mobalab.kernels._build import source

sys.path.insert(0, str(Path(__file__).parent))
from _emulation import NEEDS_CXX, harness_fixture  # noqa: E402
from _topk_emulation import (  # noqa: E402
    c16_norms,
    case_id,
    check_fold,
    check_near_ties,
    check_planted_monotone,
    check_planted_ties,
    check_query_offset,
    host_files,
    run_topk,
)

pytestmark = NEEDS_CXX


def _kernel_files() -> dict[str, str]:
    marker = "// ---- end wgmma.cuh ----"
    text = source(routing.CERT_SOURCE)
    assert text.count(marker) == 1
    text = text.replace(marker, marker + '\n#include "wgmma_host_model.h"')
    return {"topk_wgmma_cert_kernels.cu": text, **host_files()}


harness = harness_fixture("topk_wgmma_cert_harness", _kernel_files, flags=("-Wno-unknown-pragmas",))

CASES = [
    # dtype, dim, block, causal, seqlen, top_k, heads, kv_heads, batch
    (torch.bfloat16, 128, 16, True, 2100, 8, 1, 1, 1),    # 131 blocks: three chunks, 9 tiles
    (torch.float16, 64, 16, False, 1100, 15, 2, 2, 1),    # 69 blocks: tier 16 non-causal (15 + 1 entries), MHA
    (torch.bfloat16, 64, 32, True, 700, 16, 4, 1, 1),     # tier 16 causal, GQA 4, rows past seqlen
    (torch.float16, 128, 64, True, 100, 8, 2, 1, 2),      # k >= n blocks, a single partial tile, batch 2
    (torch.bfloat16, 64, 128, False, 90, 1, 2, 1, 1),     # N < B: one block, top-1
]


def _random(case, scale_q=None, scale_k=None):
    dtype, dim, block_size, causal, seqlen, top_k, heads, kv_heads, batch = case
    gen = torch.Generator().manual_seed(seqlen + dim)
    q = torch.randn((batch, seqlen, heads, dim), generator=gen)
    k = torch.randn((batch, seqlen, kv_heads, dim), generator=gen)
    if scale_q is not None:
        q = scale_q(q)
    if scale_k is not None:
        k = scale_k(k)
    q, k = q.to(dtype), k.to(dtype)
    return q, k, reference.moba_centroids(k, block_size)


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_emulated_certified_topk_matches_reference(harness, tmp_path, case):
    _, _, block_size, causal, _, top_k, *_ = case
    q, k, cent = _random(case)
    listed = []
    out = run_topk(harness, tmp_path, q, cent, block_size, top_k, causal, "certified", seed=case[4], listed=listed)
    check_near_ties(out, reference.moba_topk(q, k, block_size, top_k, causal=causal), q, cent, causal)
    # the certificate decides most random rows itself (the row list is the exception, not the path)
    assert int(listed[0].sum()) <= max(8, q.shape[0] * q.shape[1] * q.shape[2] // 10), listed[0]


def test_emulated_certified_rows_past_fp16_go_to_the_list(harness, tmp_path):
    """bf16 queries beyond fp16's range (every 7th row scaled to ~1e5) have no finite bound: those rows, and only
    such rows, are routed by the exact kernel over the row list, and every row still selects as the reference."""
    case = (torch.bfloat16, 64, 16, True, 600, 8, 2, 1, 1)
    big = torch.arange(600) % 7 == 3

    def scale(q):
        return torch.where(big[None, :, None, None], q * 1e5, q)

    q, k, cent = _random(case, scale_q=scale)
    listed = []
    out = run_topk(harness, tmp_path, q, cent, 16, 8, True, "certified", seed=5, listed=listed)
    check_near_ties(out, reference.moba_topk(q, k, 16, 8, causal=True), q, cent, True)
    # rows with candidates (t >= 16) among the big ones, per head; a few others may be undecided as well
    n_big = int(big[16:].sum())
    assert bool((listed[0] >= n_big).all()) and bool((listed[0] <= n_big + 30).all()), listed[0]


@pytest.mark.parametrize("causal", [True, False])
def test_emulated_certified_centroid_past_fp16_leaves_every_row_to_the_list(harness, tmp_path, causal):
    """One centroid beyond fp16's range makes the kv head's C infinite: no row of it is certified, the row list routes
    them all, exactly as the reference."""
    case = (torch.bfloat16, 64, 16, causal, 400, 4, 2, 1, 1)

    def scale(k):
        k = k.clone()
        k[:, 32:48] *= 1e6  # block 2: centroid entries beyond 65504
        return k

    q, k, cent = _random(case, scale_k=scale)
    assert not torch.isfinite(c16_norms(cent, q.dtype)[1]).all()
    listed = []
    out = run_topk(harness, tmp_path, q, cent, 16, 4, causal, "certified", seed=9, listed=listed)
    check_near_ties(out, reference.moba_topk(q, k, 16, 4, causal=causal), q, cent, causal)
    rows_with_candidates = 400 - 16 if causal else 400
    assert bool((listed[0] == rows_with_candidates).all()), listed[0]


@pytest.mark.parametrize("causal", [True, False])
def test_emulated_certified_exact_ties_go_to_the_higher_block(harness, tmp_path, causal):
    """Planted exact ties (equal fp16 scores too): the certificate links them, rescores them exactly and ranks ties
    by the higher block index, as the reference."""
    check_planted_ties(harness, tmp_path, causal, "certified", (12,) if causal else (3,))


@pytest.mark.parametrize("causal", [True, False])
def test_emulated_certified_topk_with_monotone_scores(harness, tmp_path, causal):
    """Distinct exact scores rising or falling along the scan (planted_monotone), neighbours 1/8 apart in alpha."""
    check_planted_monotone(harness, tmp_path, causal, "certified", (8, 16) if causal else (3, 15), rows=300)


def test_emulated_certified_near_ties_are_ranked_by_exact_scores(harness, tmp_path):
    """Centroids u + e_j with tiny distinct e_j: every score lies within the fp16 error bound of the others, so the
    certificate must rescore the whole list and rank it by the exact scores; the selections and their order equal
    the reference's (whose fp32 sums are exact here)."""
    n, block_size, dim, top_k = 150, 16, 64, 8
    gen = torch.Generator().manual_seed(21)
    u = torch.where(torch.rand(dim, generator=gen) < 0.5, -1.0, 1.0)
    # e_j: multiples of 2^-14 on one coordinate: exact in fp32 sums, below fp16's resolution of 1 (2^-10)
    e = torch.zeros((1, n, 1, dim))
    e[0, :, 0, 0] = torch.randperm(n, generator=gen).float() * 2.0**-14
    cent = u + e
    q = torch.where(torch.arange(n * block_size) % 2 == 0, 1.0, 1.0).reshape(1, -1, 1, 1) * u
    q = q.expand(1, n * block_size, 2, dim).to(torch.bfloat16)
    for causal in (True, False):
        out = run_topk(harness, tmp_path, q, cent, block_size, top_k, causal, "certified", seed=4)
        ref = reference.moba_topk_from_centroids(q, cent, block_size, top_k, causal)
        assert torch.equal(out, ref), f"causal={causal}: {(out != ref).sum().item()} slots differ"


@pytest.mark.parametrize("causal", [True, False])
def test_emulated_certified_topk_at_a_query_offset(harness, tmp_path, causal):
    check_query_offset(harness, tmp_path, causal, "certified")


@pytest.mark.parametrize("causal", [True, False])
def test_emulated_certified_topk_numbers_a_folded_batch(harness, tmp_path, causal):
    check_fold(harness, tmp_path, "certified", 15 if not causal else 8, causal)


def test_emulated_certified_sees_scores_just_below_its_threshold(harness, tmp_path):
    """Scores equal in fp16 to the list's threshold but not taken (ties keep the listed blocks) must count as
    candidates outside the list: blocks 56-63 and 0-31 score 64 in fp16 and 64 + m 2^-13 exactly (m 0-7 and
    40-71), the rest 32. A row's scan lists blocks 63..56 first, then meets 31..0 at its threshold; unless the scan
    offers scores down to 2 M below it, the row would be certified with the wrong blocks (the exact best are 31..25)."""
    n, block_size, dim, top_k = 150, 16, 64, 8
    gen = torch.Generator().manual_seed(3)
    u = torch.where(torch.rand(dim, generator=gen) < 0.5, -1.0, 1.0)
    m = torch.full((n,), -1.0)
    m[56:64] = torch.arange(8.0)
    m[:32] = 40 + torch.arange(32.0)
    alpha = torch.where(m >= 0, 1 + m * 2.0**-19, torch.full((n,), 0.5))  # 1 + m 2^-19 rounds to 1 in fp16
    cent = (alpha[:, None] * u).reshape(1, n, 1, dim)
    assert bool((cent.to(torch.float16).float()[0, m >= 0, 0] == u).all())
    first = 70 * block_size
    q = u.expand(1, n * block_size - first, 1, dim).to(torch.bfloat16)
    listed = []
    out = run_topk(harness, tmp_path, q, cent, block_size, top_k, True, "certified", seed=6, query_offset=first,
                   listed=listed)
    ref = reference.moba_topk_from_centroids(u.expand(1, n * block_size, 1, dim).to(torch.bfloat16), cent,
                                             block_size, top_k, True)[:, first:]
    assert torch.equal(out, ref), f"{(out != ref).sum().item()} slots differ"
    assert set(out[0, :, 0, 1:].flatten().tolist()) == set(range(25, 32))
    assert int(listed[0].sum()) == q.shape[1]  # no row can be certified here
