"""What the top-k emulation tests share (test_routing_mma_emulation.py, test_routing_wgmma_emulation.py): the
files both harnesses include, the centroid split as centroids.cu writes it, one planned launch through a harness,
the near-tie check and the test bodies both modules run (a random case, a query offset, planted ties)."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from _emulation import run_emulated

from mobalab.kernels import _cuda_routing as routing
from mobalab.kernels import reference
from mobalab.kernels._build import source

TIE_RTOL = 2.0**-12  # as the GPU tests: a differing slot must be a near-tie of the fp32-centroid scores


def host_files() -> dict[str, str]:
    """The files both harnesses include besides the kernel text: ptx_swizzle.h (ptx.cuh's own MOBA_SWZ_COL, for
    topk_smem_model.h) and empty CUDA headers (the host types come from cuda_host.h)."""
    m = re.search(r"^#define MOBA_SWZ_COL\(D, r, c\).*?(?<!\\)\n", source("ptx.cuh"), flags=re.M | re.S)
    assert m, "ptx.cuh defines MOBA_SWZ_COL"
    return {"ptx_swizzle.h": "#pragma once\n" + m.group(0), "cuda_bf16.h": "#pragma once\n",
            "cuda_fp16.h": "#pragma once\n"}


def split_hi_lo(c: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """hi = T(c), lo = T(c - hi): fp32 values as two of the kernels' 16-bit type T; both NaN where hi is not
    finite (so that such a block scores NaN in either precision)."""
    hi = c.to(dtype)
    lo = (c - hi.float()).to(dtype)
    bad = ~torch.isfinite(hi)
    return hi.masked_fill(bad, float("nan")), lo.masked_fill(bad, float("nan"))


def split_centroids(cent: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`split_hi_lo` of the centroids in (b, g, n, d), as centroids.cu writes them."""
    return split_hi_lo(cent.permute(0, 2, 1, 3).contiguous(), dtype)


def run_topk(exe: Path, tmp: Path, q, cent, block_size, top_k, causal, variant, seed=0,
             query_offset=0, fold_blocks=0, centroid_precision="fp32") -> torch.Tensor:
    """The selections of the top-k kernel of ``variant`` as ``topk_launch`` plans it, run by ``exe`` with seed
    ``seed``; q gets a buffer of its own (an access outside it fails) and the output starts as -7 everywhere, so
    unwritten slots show. ``centroid_precision`` "input": ``exe`` must be built with the plan's define
    (``routing.INPUT_CENTROIDS_DEFINE``); the lo halves are then NaN, so a read of them would show."""
    q = q.clone(memory_format=torch.contiguous_format)
    hi, lo = split_centroids(cent, q.dtype)
    if centroid_precision == "input":
        lo = torch.full_like(lo, float("nan"))
    out = torch.full((*q.shape[:3], top_k), -7, dtype=torch.int32)
    plan = routing.topk_launch(q, hi, lo, out, block_size, top_k, causal, query_offset, variant=variant,
                               fold_blocks=fold_blocks, centroid_precision=centroid_precision)
    assert (routing.INPUT_CENTROIDS_DEFINE in plan.defines) == (centroid_precision == "input")
    assert plan.source == (routing.WGMMA_SOURCE if variant == "wgmma" else "topk.cu")
    assert plan.kernel.endswith("_split") == (variant == "split")
    run_emulated(exe, tmp, [plan], seed)
    return out


def check_near_ties(out, ref, q, cent, causal) -> None:
    """Every slot written; the valid-slot pattern and (causal) the own block as the reference; any other
    difference a near-tie of the fp32-centroid scores, and few of them."""
    assert not (out == -7).any(), "unwritten output slots"
    assert torch.equal(out < 0, ref < 0), "valid-slot pattern differs from the reference"
    if causal:
        assert torch.equal(out[..., 0], ref[..., 0])
    bad = out != ref
    if bad.any():
        b, t, h, _ = bad.nonzero(as_tuple=True)
        group = q.shape[2] // cent.shape[2]
        qv = q[b, t, h].double()
        ck, cr = cent[b, out[bad].long(), h // group].double(), cent[b, ref[bad].long(), h // group].double()
        gap = ((qv * ck).sum(-1) - (qv * cr).sum(-1)).abs()
        bound = TIE_RTOL * qv.norm(dim=-1) * torch.maximum(ck.norm(dim=-1), cr.norm(dim=-1))
        assert bool((gap <= bound).all()), f"{int(bad.sum())} slots differ, not all near-ties"
        assert int(bad.sum()) <= max(2, out.numel() // 1000)


def case_id(case) -> str:
    """The test id of a random case (dtype, dim, block, causal, seqlen, top_k, heads, kv_heads, batch)."""
    return f"{str(case[0])[6:]}-d{case[1]}-B{case[2]}-{'c' if case[3] else 'nc'}-N{case[4]}-k{case[5]}"


def run_random_case(exe: Path, tmp: Path, case, variant, centroid_precision="fp32"):
    """(selections, q, k, centroids) of a random case (dtype, dim, block, causal, seqlen, top_k, heads, kv_heads,
    batch): inputs seeded by seqlen + dim, the launch by seqlen."""
    dtype, dim, block_size, causal, seqlen, top_k, heads, kv_heads, batch = case
    gen = torch.Generator().manual_seed(seqlen + dim)
    q = torch.randn((batch, seqlen, heads, dim), generator=gen).to(dtype)
    k = torch.randn((batch, seqlen, kv_heads, dim), generator=gen).to(dtype)
    cent = reference.moba_centroids(k, block_size)
    out = run_topk(exe, tmp, q, cent, block_size, top_k, causal, variant, seed=seqlen,
                   centroid_precision=centroid_precision)
    return out, q, k, cent


def check_random_case(exe: Path, tmp: Path, case, variant, centroid_precision="fp32") -> torch.Tensor:
    """:func:`run_random_case` against ``reference.moba_topk`` with the same ``centroid_precision``
    (:func:`check_near_ties`, on the centroids that precision scores); the selections."""
    dtype, _, block_size, causal, _, top_k, *_ = case
    out, q, k, cent = run_random_case(exe, tmp, case, variant, centroid_precision)
    ref = reference.moba_topk(q, k, block_size, top_k, causal=causal, centroid_precision=centroid_precision)
    check_near_ties(out, ref, q, cent.to(dtype).float() if centroid_precision == "input" else cent, causal)
    return out


def check_query_offset(exe: Path, tmp: Path, causal: bool, variant: str) -> None:
    """Rows of q from position 1000 (inside block 62 of 16 keys) over the whole sequence's centroids select what
    the whole sequence's routing selects at those positions (:func:`check_near_ties`)."""
    gen = torch.Generator().manual_seed(11)
    q = torch.randn((1, 1400, 2, 64), generator=gen).to(torch.bfloat16)
    k = torch.randn((1, 1400, 1, 64), generator=gen).to(torch.bfloat16)
    cent = reference.moba_centroids(k, 16)
    out = run_topk(exe, tmp, q[:, 1000:], cent, 16, 8, causal, variant, seed=3, query_offset=1000)
    ref = reference.moba_topk(q, k, 16, 8, causal=causal)[:, 1000:]
    check_near_ties(out, ref, q[:, 1000:], cent, causal)


def check_fold(exe: Path, tmp: Path, variant: str, top_k: int, causal: bool) -> None:
    """A batch of three sequences routed with ``fold_blocks`` = n: the selections renumbered for the sequences end
    to end (``_batch_fold.folded_topk`` of the same kernel's plain selections, -1 slots kept), exactly."""
    from mobalab.kernels._batch_fold import folded_topk

    gen = torch.Generator().manual_seed(top_k)
    q = torch.randn((3, 208, 2, 64), generator=gen).to(torch.bfloat16)
    cent = reference.moba_centroids(torch.randn((3, 208, 1, 64), generator=gen).to(torch.bfloat16), 16)
    plain = run_topk(exe, tmp, q, cent, 16, top_k, causal, variant, seed=1)
    folded = run_topk(exe, tmp, q, cent, 16, top_k, causal, variant, seed=2, fold_blocks=13)
    assert not (folded == -7).any() and bool((plain < 0).any())  # unused slots: early causal rows, or k > n
    assert torch.equal(folded, folded_topk(plain, 13))


def planted_ties(causal: bool, n: int = 150, block_size: int = 16, dim: int = 64):
    """(q, centroids) with exact scores in every precision: centroids alpha_j u with few distinct alpha_j (many
    exact ties), queries +-u in bf16; batch, heads and kv heads 1, n blocks, the last one 11 keys short."""
    gen = torch.Generator().manual_seed(7 + int(causal))
    u = torch.where(torch.rand(dim, generator=gen) < 0.5, -1.0, 1.0)
    alpha = (torch.randint(0, 5, (1, n, 1), generator=gen).float() + 1) / 8
    cent = alpha[..., None] * u  # (b, n, g, d), exact in bf16
    seqlen = n * block_size - 5
    sign = torch.where(torch.rand(1, seqlen, 1, 1, generator=gen) < 0.5, -1.0, 1.0)
    return (sign * u).to(torch.bfloat16), cent


def planted_monotone(n: int = 150, block_size: int = 16, dim: int = 64):
    """(q, centroids) with distinct exact scores that rise along the block index in a zigzag: centroids alpha_j u
    with alpha_j = (n - j + 100 [j even]) / 8 (older blocks score higher, and every even block above both its odd
    neighbours), queries +u on even rows and -u on odd rows (there the newest blocks score higher, the odd ones
    above the even). A scan from the newest block down meets rising scores on the even rows (every offer enters the
    list) and falling ones on the odd rows (a row's first entries are final); on both, a word's best scores sit one
    per column pair, so a bound on a word's cap-th best taken from its pair maxima has no slack."""
    gen = torch.Generator().manual_seed(11)
    u = torch.where(torch.rand(dim, generator=gen) < 0.5, -1.0, 1.0)
    j = torch.arange(n, dtype=torch.float32)
    alpha = ((n - j + 100 * (j % 2 == 0)) / 8).reshape(1, n, 1)
    cent = alpha[..., None] * u
    seqlen = n * block_size - 5
    sign = torch.where(torch.arange(seqlen) % 2 == 0, 1.0, -1.0).reshape(1, seqlen, 1, 1)
    return (sign * u).to(torch.bfloat16), cent


def check_planted_monotone(exe: Path, tmp: Path, causal: bool, variant: str, top_ks, rows: int | None = None) -> None:
    """:func:`planted_monotone` through the harness: the selections equal the reference's exactly; ``rows``: the
    last rows only, at a query offset."""
    q, cent = planted_monotone()
    first = 0 if rows is None else q.shape[1] - rows
    for top_k in top_ks:
        out = run_topk(exe, tmp, q[:, first:], cent, 16, top_k, causal, variant, seed=top_k,
                       **({} if rows is None else {"query_offset": first}))
        ref = reference.moba_topk_from_centroids(q, cent, 16, top_k, causal)[:, first:]
        assert torch.equal(out, ref), f"top_k={top_k}: {(out != ref).sum().item()} slots differ"


def check_planted_ties(exe: Path, tmp: Path, causal: bool, variant: str, top_ks, rows: int | None = None,
                       block_size: int = 16) -> None:
    """:func:`planted_ties` through the harness: the selections equal the reference's exactly (ties to the higher
    block index), for each top-k of ``top_ks``; ``rows``: the last rows only, at a query offset."""
    q, cent = planted_ties(causal, block_size=block_size)
    seqlen, n = q.shape[1], cent.shape[1]
    first = 0 if rows is None else seqlen - rows
    for top_k in top_ks:
        out = run_topk(exe, tmp, q[:, first:], cent, block_size, top_k, causal, variant, seed=top_k,
                       **({} if rows is None else {"query_offset": first}))
        ref = reference.moba_topk_from_centroids(q, cent, block_size, top_k, causal)[:, first:]
        assert torch.equal(out, ref), f"top_k={top_k}: {(out != ref).sum().item()} slots differ"
    assert -(-seqlen // block_size) == n


def check_input_is_rounded_fp32(exe_input: Path, exe: Path, tmp: Path, case, variant: str) -> None:
    """The "input" build (lo poisoned) selects exactly what the default build selects from centroids equal to their
    rounding to q's dtype (lo = 0: the same sums), and what the reference selects in that precision up to near-ties."""
    dtype, dim, block_size, causal, seqlen, top_k, *_ = case
    got, q, k, cent = run_random_case(exe_input, tmp, case, variant, "input")
    rounded = cent.to(dtype).float()
    check_near_ties(got, reference.moba_topk(q, k, block_size, top_k, causal=causal, centroid_precision="input"), q,
                    rounded, causal)
    assert torch.equal(got, run_topk(exe, tmp, q, rounded, block_size, top_k, causal, variant, seed=seqlen))


def check_input_ignores_lo(exe_input: Path, exe: Path, tmp: Path, variant: str, causal: bool) -> None:
    """Centroids u + e_j whose roundings to bf16 are all u (|e_j| below half a bf16 step of u's entries): "input"
    sees one score for every block and takes the highest blocks (the tie order), where "fp32" ranks by q.e_j."""
    n, block_size, dim, top_k = 150, 16, 64, 8
    gen = torch.Generator().manual_seed(5)
    u = torch.where(torch.rand(dim, generator=gen) < 0.5, -1.0, 1.0)
    cent = (u + (torch.rand((1, n, 1, dim), generator=gen) * 2 - 1) * 2.0**-11).float()
    assert torch.equal(cent.to(torch.bfloat16).float(), u.expand_as(cent))
    q = torch.randn((1, n * block_size, 2, dim), generator=gen).to(torch.bfloat16)
    args = (block_size, top_k, causal, variant)
    got = run_topk(exe_input, tmp, q, cent, *args, centroid_precision="input")
    ties = run_topk(exe, tmp, q, u.expand_as(cent).contiguous(), *args)
    assert torch.equal(got, ties)
    assert not torch.equal(run_topk(exe, tmp, q, cent, *args), ties)
