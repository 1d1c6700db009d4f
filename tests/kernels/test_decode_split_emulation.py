"""The three-launch decode kernels (cuda/decode_split.cu) run on the host: their logic against the torch
reference, no GPU.

``host_emulation/cuda_host.h`` runs every CUDA thread as a coroutine (switching at __syncthreads and the warp
operations, in shuffled orders), completes every cp.async only when its thread waits for it, and runs the
CTAs of a grid one after another in a shuffled order, so any CTA can be the last of its group (the one that
merges). The harness executes exactly the launches ``_cuda_decode_split.split_launches`` plans for a cache on
the CPU (grid, shared-memory size, arguments checked against the kernel signatures), compiled with
AddressSanitizer: an access beyond a buffer or beyond the planned shared memory fails the run; every output
and scratch buffer is poisoned first. The selection launch also runs alone on crafted score rows (exact ties,
signed zeros, infinities, NaN, orders that make every candidate an insertion, thousands of candidates). What
this cannot show (PTX, the memory model between concurrent CTAs, speed) is left to the GPU tests.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from mobalab.kernels import MobaKVCache
from mobalab.kernels import _cuda_decode_split as S
from mobalab.kernels import _decode as D
from mobalab.kernels._build import source

sys.path.insert(0, str(Path(__file__).parent))
from _decode_cases import assert_step_matches_reference, decode_case  # noqa: E402
from _emulation import NEEDS_CXX, harness_fixture, poison, run_emulated  # noqa: E402

pytestmark = NEEDS_CXX


def _kernel_files() -> dict[str, str]:
    return {"decode_split_kernels.cu": source("decode_split.cu")}


harness = harness_fixture("decode_split_harness", _kernel_files)


BF, FP = torch.bfloat16, torch.float16
CASES = [
    # dtype, d, B, kv_heads, heads, q_len, prompt lengths, top_k, score range blocks (None: the plan's), options
    pytest.param(BF, 128, 16, 2, 8, 1, [1500, 333], 8, 40, {}, id="bf16-d128-B16-gqa4-ragged-ranges"),
    pytest.param(FP, 64, 16, 1, 2, 2, [4500, 100], 4, 264, {}, id="fp16-d64-B16-qlen2-passes-per-warp"),
    pytest.param(FP, 128, 128, 1, 2, 3, [520, 390], 3, None, {}, id="fp16-d128-B128-qlen3-chunks"),
    pytest.param(BF, 64, 32, 1, 16, 5, [300], 4, None, {}, id="bf16-d64-B32-two-row-groups"),
    pytest.param(BF, 128, 16, 2, 2, 2, [40, 17], 1, None, {}, id="bf16-top1-own-only"),
    pytest.param(FP, 64, 64, 1, 1, 16, [150], 32, None, {}, id="fp16-qlen16-topk32-fewer-blocks"),
    pytest.param(BF, 64, 16, 1, 2, 1, [1400], 16, 24, dict(ties=True), id="bf16-exact-ties-across-ranges"),
    pytest.param(BF, 128, 64, 1, 8, 1, [3000], 4, None, dict(shared=True), id="bf16-B64-shared-selection"),
    pytest.param(FP, 128, 16, 2, 6, 7, [5, 1300, 250], 5, 17, {}, id="fp16-gqa3-qlen7-tiny-seq"),
    # 5000 candidates: the score warps stream several passes, the select warps several rounds of loads
    pytest.param(BF, 64, 16, 1, 2, 1, [80_020, 2100], 8, 1280, {}, id="bf16-d64-5000-candidates"),
    # paged caches (the attend_paged kernel): pages of one block, of several blocks, ragged and GQA, shuffled pages
    pytest.param(BF, 128, 16, 2, 8, 1, [1500, 333], 8, None, dict(page_size=16), id="bf16-paged-one-block-pages"),
    pytest.param(FP, 64, 32, 1, 2, 3, [700, 45, 260], 4, None, dict(page_size=128), id="fp16-paged-4-blocks"),
    pytest.param(FP, 128, 128, 2, 4, 2, [520, 390], 3, None, dict(page_size=256), id="fp16-paged-B128-chunks"),
]
_ARGS = ("dtype", "dim", "block", "kv_heads", "heads", "q_len", "lengths", "top_k", "range_blocks", "opts")


def _run_case(harness, tmp_path, dtype, dim, block, kv_heads, heads, q_len, lengths, top_k, range_blocks, opts,
              seed=7, route_only=False, attn_ctas=None, **built):
    cache, q = decode_case(dim + block + heads + q_len, dtype, dim, block, kv_heads, heads, q_len, lengths, **opts)
    top_k, scale = D.check_decode(q, cache, top_k, kernel_limits=True)
    plan, bufs, launches = S.split_launches(q, cache, top_k, scale, route_only=route_only, range_blocks=range_blocks,
                                            attn_ctas=attn_ctas, **built)
    if not route_only:
        assert launches[-1].kernel.startswith("moba_decode_attend_paged_") == cache.paged, launches[-1].kernel
    poison(bufs)
    run_emulated(harness, tmp_path, launches, seed=seed)
    return cache, q, top_k, scale, plan, bufs


def _fused_fits(case) -> bool:
    """Whether the selection inside the attention launch serves ``case`` (its plan with the default ranges)."""
    dtype, dim, block, kv_heads, heads, q_len, lengths, top_k, range_blocks, opts = case
    length = max(lengths) + q_len
    return S.plan_split(len(lengths), q_len, heads, kv_heads, dim, block, top_k, length, length // block + 1,
                        length + block, range_blocks=range_blocks).fused_select


@pytest.mark.parametrize(_ARGS, CASES)
def test_emulated_split_kernels_match_reference(harness, tmp_path, dtype, dim, block, kv_heads, heads, q_len,
                                                lengths, top_k, range_blocks, opts):
    """The three launches (score, select, attention) against the reference."""
    cache, q, top_k, scale, plan, bufs = _run_case(harness, tmp_path, dtype, dim, block, kv_heads, heads, q_len,
                                                   lengths, top_k, range_blocks, opts, fused_select=False)
    assert not plan.fused_select
    assert_step_matches_reference(q, cache, top_k, scale, bufs, block=block, lengths=lengths,
                                  ties=opts.get("ties", False))


FUSED_CASES = [c for c in CASES if _fused_fits(c.values)]


# The selecting attention CTAs wait for their own kv head's score CTAs by default: a release counter per kv head,
# which every score CTA, early-ending ones too, raises (the model fails a wait on a counter the launch before did not
# fill) and the kv head's last attention CTA empties. The build DSP_OWN_WAIT=0 waits for the whole score launch
# (griddepcontrol.wait, which the model's in-order launches satisfy). Both leave the counters zero.
harness_grid = harness_fixture("decode_split_harness", _kernel_files, flags=("-DDSP_OWN_WAIT=0",),
                               name="harness_grid")


@pytest.mark.parametrize("build", ["harness", "harness_grid"], ids=["own-kv-head-wait", "grid-wait"])
@pytest.mark.parametrize(_ARGS, FUSED_CASES)
def test_emulated_fused_selection_matches_reference(request, tmp_path, build, dtype, dim, block, kv_heads, heads,
                                                    q_len, lengths, top_k, range_blocks, opts):
    """Two launches: the score pass with its batch tops, then the attention CTAs selecting themselves (each once its
    kv head's score CTAs have all released its counter, or, built so, once the score launch has completed)."""
    cache, q, top_k, scale, plan, bufs = _run_case(request.getfixturevalue(build), tmp_path, dtype, dim, block,
                                                   kv_heads, heads, q_len, lengths, top_k, range_blocks, opts)
    assert plan.fused_select and plan.n_counters == 2 * len(lengths) * kv_heads
    assert_step_matches_reference(q, cache, top_k, scale, bufs, block=block, lengths=lengths,
                                  ties=opts.get("ties", False))
    assert not cache._counters.any()


# centroid_precision "input": the score pass built with MOBA_DECODE_CENTROIDS_INPUT=1 ranks the candidates by
# q . T(S_j / B), the block mean rounded to the cache's dtype; keys of a mean of 2 and a spread of a few ulps there,
# so that the rounding changes many selections (the fp32 routing must differ for the test to tell them apart)
harness_input = harness_fixture("decode_split_harness", _kernel_files, flags=("-DMOBA_DECODE_CENTROIDS_INPUT=1",),
                                name="harness_input")
INPUT_CASES = [
    pytest.param(BF, 128, 16, 2, 8, 1, [1500, 333], 8, 48, dict(key_mean=2.0), id="bf16-d128-B16-gqa4-ranges"),
    pytest.param(FP, 64, 64, 1, 4, 2, [3000, 700], 4, None, dict(key_mean=2.0, page_size=128), id="fp16-d64-paged"),
]


@pytest.mark.parametrize("fused_select", [False, True], ids=["select-launch", "selecting-attention"])
@pytest.mark.parametrize(_ARGS, INPUT_CASES)
def test_emulated_input_centroid_routing_matches_reference(harness_input, tmp_path, fused_select, dtype, dim, block,
                                                           kv_heads, heads, q_len, lengths, top_k, range_blocks,
                                                           opts):
    cache, q, top_k, scale, plan, bufs = _run_case(harness_input, tmp_path, dtype, dim, block, kv_heads, heads,
                                                   q_len, lengths, top_k, range_blocks, opts,
                                                   fused_select=fused_select, centroid_precision="input")
    assert plan.fused_select == fused_select
    assert_step_matches_reference(q, cache, top_k, scale, bufs, block=block, lengths=lengths,
                                  centroid_precision="input")
    assert not torch.equal(bufs["sel"], D._route(q, cache, top_k))  # the fp32 routing selects otherwise
    _, _, launches = S.split_launches(q, cache, top_k, scale, fused_select=fused_select, centroid_precision="input")
    assert [x.defines for x in launches] == [("MOBA_DECODE_CENTROIDS_INPUT=1",)] + [()] * (len(launches) - 1)


ATTN_CASES = [
    # (case, attention CTAs per kv head): several items per CTA (the next chunk in flight while one is computed),
    # strides that are and are not multiples of the chunks per block
    pytest.param(CASES[0].values, 1, id="one-cta-per-kv-head"),
    pytest.param(CASES[2].values, 3, id="three-ctas-two-chunks"),
    pytest.param(CASES[7].values, 2, id="shared-blocks-two-ctas"),
    # 512 entries over 1250 blocks: up to 512 selected blocks, taken in batches of 128
    pytest.param((BF, 64, 16, 1, 16, 2, [20_000], 16, None, {}), 5, id="several-batches"),
    # 4400 blocks: a set of 138 words, read in two windows (the second of 10 words), several batches in the first
    pytest.param((FP, 64, 16, 1, 8, 4, [70_400], 16, None, {}), 3, id="two-windows"),
    # 128 query rows at d 128: entries and rows too large to keep in shared memory, read from global memory
    pytest.param((FP, 128, 16, 1, 32, 4, [700, 300], 4, None, {}), 2, id="rows-not-cached"),
    # the selection inside the attention launch (8 rows): 256 entries over 1250 blocks, two batches; 4400 blocks, a
    # set of 138 words in shared memory read in two windows
    pytest.param((BF, 64, 16, 1, 8, 1, [20_000], 32, None, {}), 5, id="fused-several-batches"),
    pytest.param((FP, 64, 16, 1, 8, 1, [70_400], 32, None, {}), 3, id="fused-two-windows"),
]


@pytest.mark.parametrize(("case", "attn_ctas"), ATTN_CASES)
def test_attention_items_shared_by_fewer_ctas(harness, tmp_path, case, attn_ctas):
    """Fewer attention CTAs than items: each walks its share of the kv head's selected blocks with the next
    chunk's copies in flight; the step matches the reference, and the counters and sets of selected blocks are
    zero again afterwards (the next step relies on it)."""
    cache, q, top_k, scale, plan, bufs = _run_case(harness, tmp_path, *case, attn_ctas=attn_ctas)
    assert plan.cpg == attn_ctas
    dtype, dim, block, kv_heads, heads, q_len, lengths, _, _, opts = case
    assert_step_matches_reference(q, cache, top_k, scale, bufs, block=block, lengths=lengths,
                                  ties=opts.get("ties", False))
    assert not cache._counters.any()


def test_attention_cases_reach_their_paths():
    plans = [S.plan_split(len(c[6]), c[5], c[4], c[3], c[1], c[2], c[7], max(c[6]) + c[5], 1, 1, attn_ctas=n)
             for c, n in (p.values for p in ATTN_CASES)]
    assert not all(p.cached for p in plans)
    assert any(p.cpg % p.n_chunks for p in plans if p.n_chunks > 1)
    assert any(p.fused_select and p.n_words > S.ATTN_THREADS for p in plans)  # the fused path's second window
    assert any(p.fused_select for p in (S.plan_split(len(c[6]), c[5], c[4], c[3], c[1], c[2], c[7],
                                                     max(c[6]) + c[5], 1, 1) for c in (x.values for x in CASES)))


# hundreds of selected blocks of two chunks each, shared by five CTAs: which chunks a CTA folds together depends on
# where the blocks fall in the order the CTAs share them by
MANY_BLOCKS = (BF, 64, 64, 1, 16, 2, [40_000], 16, None, {})


@pytest.mark.parametrize(("case", "attn_ctas"), [(CASES[1].values, None), (MANY_BLOCKS, 5)],
                         ids=["score-ranges", "many-blocks-five-ctas"])
def test_other_cta_orders_give_the_same_step(harness, tmp_path, case, attn_ctas):
    """Other random orders of the CTAs (and of the threads): bit-identical outputs. With hundreds of selected
    blocks entered by rows in a different order, the set (and the order in which the attention CTAs share its
    blocks, and so which chunks one CTA folds together) stays the same."""
    runs = [_run_case(harness, tmp_path, *case, seed=s, attn_ctas=attn_ctas) for s in (1, 2)]
    assert runs[0][4].n_range > 1 or runs[0][4].cpg == attn_ctas
    for name in ("sel", "out", "lse"):
        assert torch.equal(runs[0][-1][name], runs[1][-1][name]), name


# The attention kernel built with 32-token items (8 tokens a warp, P V by m16n8k8) and four stages (three items in
# flight, so every cp.async wait depth runs): the build options the benchmarks time against the default.
BUILT = dict(attn_chunk=32, attn_stages=4)
harness_built = harness_fixture("decode_split_harness", _kernel_files,
                                flags=tuple(f"-D{d}" for d in S.attn_build(**BUILT)[1]), name="harness_built")


@pytest.mark.parametrize(("case", "attn_ctas"), [(CASES[0].values, 2), (CASES[2].values, 1), (CASES[12].values, 1)],
                         ids=["gqa4-ragged", "B128-qlen3-chunks", "paged-B128"])
def test_attention_build_options_match_reference(harness_built, tmp_path, case, attn_ctas):
    cache, q, top_k, scale, plan, bufs = _run_case(harness_built, tmp_path, *case, attn_ctas=attn_ctas, **BUILT)
    assert plan.chunk == min(case[2], 32) and plan.cpg == attn_ctas
    dtype, dim, block, kv_heads, heads, q_len, lengths, _, _, opts = case
    assert_step_matches_reference(q, cache, top_k, scale, bufs, block=block, lengths=lengths,
                                  ties=opts.get("ties", False))
    assert not cache._counters.any()


# The attention kernel built to copy K and V by 16-byte cp.async copies of every thread (DSP_ATTN_TMA=0; the
# default build copies by tensor maps: cp.async.bulk.tensor with the 128-byte swizzle, one thread issuing, mbarrier
# phases counted over the batches, which the model lands only when a thread waits on a phase, with the swizzle and
# zeros beyond the tensor, checking the bytes and the 1 KB alignment).
harness_cp = harness_fixture("decode_split_harness", _kernel_files, flags=("-DDSP_ATTN_TMA=0",), name="harness_cp")


@pytest.mark.parametrize(("case", "attn_ctas"), [
    (CASES[0].values, 2), (CASES[1].values, None), (CASES[2].values, 3), (CASES[8].values, 1),
    (CASES[11].values, 1), (CASES[12].values, 2), (ATTN_CASES[3].values[0], 5), (ATTN_CASES[4].values[0], 3),
], ids=["d128-B16-gqa4-ragged", "d64-B16-qlen2", "B128-chunks-three-ctas", "tiny-seq", "paged-B32", "paged-B128",
        "several-batches", "two-windows"])
def test_cp_async_build_matches_reference(harness_cp, tmp_path, case, attn_ctas):
    cache, q, top_k, scale, plan, bufs = _run_case(harness_cp, tmp_path, *case, attn_ctas=attn_ctas)
    dtype, dim, block, kv_heads, heads, q_len, lengths, _, _, opts = case
    assert_step_matches_reference(q, cache, top_k, scale, bufs, block=block, lengths=lengths,
                                  ties=opts.get("ties", False))
    assert not cache._counters.any()


@pytest.mark.parametrize("build", ["harness", "harness_cp"])
def test_rows_beyond_the_length_never_reach_the_output(request, tmp_path, build):
    """NaN in the cache's K and V rows past every sequence's length (which a partial block's item copies along):
    the step still matches the reference, for the tensor-map copies (rows zeroed after they land) and the cp.async
    copies (zero-filled rows)."""
    case = CASES[2].values  # B 128, two 64-token items per block, partial own blocks
    dtype, dim, block, kv_heads, heads, q_len, lengths, top_k, range_blocks, opts = case
    cache, q = decode_case(dim + block + heads + q_len, dtype, dim, block, kv_heads, heads, q_len, lengths, **opts)
    for b, length in enumerate(cache.lengths.tolist()):
        cache.k[b, :, length:] = float("nan")
        cache.v[b, :, length:] = float("nan")
    top_k, scale = D.check_decode(q, cache, top_k, kernel_limits=True)
    plan, bufs, launches = S.split_launches(q, cache, top_k, scale, range_blocks=range_blocks)
    poison(bufs)
    run_emulated(request.getfixturevalue(build), tmp_path, launches, seed=5)
    assert_step_matches_reference(q, cache, top_k, scale, bufs, block=block, lengths=lengths)


def test_route_only_launches_write_the_selection_alone(harness, tmp_path):
    cache, q, top_k, _, plan, bufs = _run_case(harness, tmp_path, *CASES[0].values, route_only=True)
    assert plan.n_range > 1
    assert torch.equal(bufs["sel"], D._route(q, cache, top_k))
    assert torch.isnan(bufs["lse"]).all() and torch.isnan(bufs["part_ml"]).all()  # no attention ran


def test_score_pass_writes_every_candidate_score_and_nothing_beyond(harness, tmp_path):
    """The scratch after the score launch alone: q . S_j in fp32 for the row's candidates, NaN for the blocks
    from the row's own block up to the sequence's last own block, columns beyond untouched (poison kept)."""
    dtype, dim, block, kv_heads, heads, q_len, lengths = FP, 128, 16, 2, 6, 3, [702, 1300, 94]
    cache, q = decode_case(11, dtype, dim, block, kv_heads, heads, q_len, lengths)
    top_k, scale = D.check_decode(q, cache, 4, kernel_limits=True)
    plan, bufs, launches = S.split_launches(q, cache, top_k, scale, route_only=True, range_blocks=20)
    assert launches[0].kernel == "moba_decode_route_score_fp16_d128" and plan.n_range > 1
    bufs["scores"].fill_(12345.0)
    run_emulated(harness, tmp_path, launches[:1], seed=3)
    got = bufs["scores"].view(len(lengths), kv_heads, plan.rows, plan.n_cols)
    group = heads // kv_heads
    for b, length in enumerate(cache.lengths.tolist()):
        c_last = (length - 1) // block
        sums = cache.block_sums[b, :, :c_last].double()  # (kv_heads, c_last, d)
        qb = q[b].double().view(q_len, kv_heads, group, dim).permute(1, 0, 2, 3).reshape(kv_heads, plan.rows, dim)
        want = torch.einsum("krd,kjd->krj", qb, sums)
        bound = 1e-5 * torch.einsum("krd,kjd->krj", qb.abs(), sums.abs())  # fp32 sums of d products
        own = torch.tensor([(length - q_len + r // group) // block for r in range(plan.rows)])
        cand = torch.arange(c_last).view(1, -1) < own.view(-1, 1)  # (rows, c_last)
        mine = got[b, :, :, :c_last]
        assert torch.isnan(mine[:, ~cand]).all() and not torch.isnan(mine[:, cand]).any()
        assert ((mine[:, cand].double() - want[:, cand]).abs() <= bound[:, cand]).all()
        assert (got[b, :, :, c_last:] == 12345.0).all()


def _selection(scores: torch.Tensor, lengths, q_len, heads, kv_heads, block, top_k) -> torch.Tensor:
    """Plain-Python selection from a scores scratch (b, kv_heads, R, n_cols): own block, then the best k-1 of
    blocks j < own by (score desc, block desc), NaN never, -1 where they run out."""
    group = heads // kv_heads
    sel = torch.full((len(lengths), q_len, heads, top_k), -1, dtype=torch.int32)
    for b, length in enumerate(lengths):
        for kvh in range(kv_heads):
            for r in range(group * q_len):
                i, g = divmod(r, group)
                own = (length - q_len + i) // block
                row = scores[b, kvh, r, :own].tolist()
                best = sorted(((v, j) for j, v in enumerate(row) if not math.isnan(v)), key=lambda e: (-e[0], -e[1]))
                picks = [own] + [j for _, j in best[:top_k - 1]]
                sel[b, i, kvh * group + g, :len(picks)] = torch.tensor(picks, dtype=torch.int32)
    return sel


def _crafted_rows(kind: str, rows: int, n: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "all-equal":
        return torch.ones(rows, n)
    if kind == "signed-zeros-infs":  # -0 == +0 tie on the block index; -inf is a (last) candidate, +inf the best
        pool = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 1.0, -1.0])
        return pool[torch.randint(0, len(pool), (rows, n), generator=gen)]
    if kind == "signed-zeros-decide":  # the best are zeros of both signs: only the block index orders them
        pool = torch.tensor([0.0, -0.0, -1.0, float("-inf")])
        return pool[torch.randint(0, len(pool), (rows, n), generator=gen)]
    if kind == "few-levels-nan":  # massive exact ties between a handful of levels, NaN sprinkled in
        x = torch.randint(0, 5, (rows, n), generator=gen).float()
        return torch.where(torch.rand(rows, n, generator=gen) < 0.2, torch.tensor(float("nan")), x)
    if kind == "descending":  # from the newest block down the scores rise: every candidate is an insertion
        return -torch.arange(n, dtype=torch.float32).repeat(rows, 1)
    if kind == "ascending":
        return torch.arange(n, dtype=torch.float32).repeat(rows, 1)
    if kind == "same-lane":  # at d 128 the best batches (16 blocks each) are all lane 0's: t = 0 mod 32
        x = torch.randn(rows, n, generator=gen)
        x[:, (torch.arange(n) // 16) % 32 == 0] += 10.0
        return x
    if kind == "all-nan-but-two":
        x = torch.full((rows, n), float("nan"))
        x[:, 3], x[:, n // 2] = 2.0, 2.0
        return x
    return torch.randn(rows, n, generator=gen)


def _batch_tops(scores: torch.Tensor, lengths, q_len, heads, block, bw, n_bat) -> torch.Tensor:
    """What the score pass writes beside the scores for the tops selection: the largest score of every batch of
    ``bw`` blocks of a row over its candidates (j < its own block, NaN never), NaN where there is none."""
    group = heads // scores.shape[1]
    batch, kv_heads, rows, _ = scores.shape
    tops = torch.full((batch, kv_heads, rows, n_bat), float("nan"))
    for b, length in enumerate(lengths):
        for r in range(rows):
            own = (length - q_len + r // group) // block
            for t in range(n_bat):
                part = scores[b, :, r, t * bw:min(own, (t + 1) * bw)]
                if part.shape[-1]:
                    tops[b, :, r, t] = torch.where(part.isnan(), float("-inf"), part).amax(-1)
                    tops[b, :, r, t] = torch.where(part.isnan().all(-1), float("nan"), tops[b, :, r, t])
    return tops


def _select_on_crafted(harness, tmp_path, kind, lengths, block, q_len, heads, kv_heads, top_k, gen, seed,
                       select_wpr=None, fused=False, dim=64):
    """The selection alone on ``kind`` score rows (777 beyond a row's candidates, NaN from its own block on, as the
    score pass writes them): the select launch, or (``fused``) the attention launch of a random cache of these
    lengths selecting from the rows and their batch tops. (plan, the scores it read, its buffers, the plain-Python
    selection)."""
    batch, rows = len(lengths), heads // kv_heads * q_len
    n_blocks = max(lengths) // block + 1
    if fused:
        cache, q = decode_case(seed, torch.bfloat16, dim, block, kv_heads, heads, q_len, [n - q_len for n in lengths])
        assert cache.lengths.tolist() == list(lengths)
        _, scale = D.check_decode(q, cache, top_k, kernel_limits=True)
        plan, bufs, launches = S.split_launches(q, cache, top_k, scale, fused_select=True)
        poison(bufs)
    else:
        plan = S.plan_split(batch, q_len, heads, kv_heads, 64, block, top_k, max(lengths), n_blocks,
                            n_blocks * block, select_wpr=select_wpr, fused_select=False)
    scores = torch.full((batch, kv_heads, rows, plan.n_cols), 777.0)  # beyond a row's candidates: must be ignored
    for b, length in enumerate(lengths):
        c_last = (length - 1) // block
        scores[b, :, :, :c_last] = _crafted_rows(kind, kv_heads * rows, c_last, gen).view(kv_heads, rows, c_last)
    for b, length in enumerate(lengths):  # the score pass's NaN: blocks from a row's own block on
        for r in range(rows):
            own = (length - q_len + r // (heads // kv_heads)) // block
            scores[b, :, r, own:(length - 1) // block] = float("nan")
    want = _selection(scores, lengths, q_len, heads, kv_heads, block, top_k)
    if fused:
        bufs["scores"].copy_(scores.reshape(-1))
        bufs["tops"].copy_(_batch_tops(scores, lengths, q_len, heads, block, S.score_batch(dim), plan.n_bat)
                           .reshape(-1))
        released = launches[-1].args[26]  # as the score launch leaves them: every score CTA of a kv head released
        released.fill_(plan.n_rg * plan.n_range)
        run_emulated(harness, tmp_path, [launches[-1]], seed=seed)
        assert not cache._counters.any()
        return plan, scores, bufs, want
    bufs = {"scores": scores.reshape(-1).contiguous(), "sel": torch.full((batch, q_len, heads, top_k), -7,
                                                                            dtype=torch.int32)}
    lengths_t = torch.tensor(lengths, dtype=torch.int32)
    run_emulated(harness, tmp_path, [S.select_launch(plan, lengths_t, bufs)], seed=seed)
    return plan, scores, bufs, want


@pytest.mark.parametrize(("kind", "lengths", "block", "q_len", "heads", "kv_heads", "top_k"), [
    ("all-equal", [900, 33, 300], 16, 1, 4, 2, 8),
    ("signed-zeros-infs", [2000, 1000], 16, 2, 2, 1, 16),
    ("signed-zeros-decide", [3000, 700], 16, 1, 4, 1, 8),
    ("few-levels-nan", [5000 * 16 + 9, 4000], 16, 1, 2, 1, 32),
    ("descending", [3000, 700], 16, 3, 2, 2, 8),
    ("ascending", [3000], 16, 1, 1, 1, 32),
    ("all-nan-but-two", [1000, 200], 16, 2, 3, 3, 6),
    ("random", [5000 * 16 + 1, 16, 17], 16, 1, 4, 1, 2),
    ("random", [400, 600], 32, 4, 8, 2, 1),
])
@pytest.mark.parametrize("fused", [False, True], ids=["select-launch", "attention-launch"])
def test_selection_on_crafted_scores(harness, tmp_path, kind, lengths, block, q_len, heads, kv_heads, top_k, fused):
    """The selection on crafted score rows vs the plain-Python selection (exactly, ties included): the select
    launch's warp lists over every candidate, or the attention CTAs' two levels over the score batches' tops."""
    if fused and top_k == 1:
        pytest.skip("top_k 1: no score launch, nothing to rank")
    gen = torch.Generator().manual_seed(len(kind) + top_k)
    plan, scores, bufs, want = _select_on_crafted(harness, tmp_path, kind, lengths, block, q_len, heads, kv_heads,
                                                  top_k, gen, seed=5, fused=fused)
    assert plan.fused_select == fused
    assert torch.equal(bufs["sel"], want), (bufs["sel"] != want).nonzero()[:8]
    torch.testing.assert_close(bufs["scores"].view_as(scores), scores, rtol=0, atol=0, equal_nan=True)  # read only


@pytest.mark.parametrize(("kind", "lengths", "top_k"), [
    ("same-lane", [70_000, 3000], 8), ("ascending", [70_000], 8), ("random", [70_000, 900], 16)])
def test_selection_over_two_rounds_of_batch_tops_at_d128(harness, tmp_path, kind, lengths, top_k):
    """The attention CTAs' selection at d 128 (batches of 16 blocks) where level 1 ranks two rounds of chunks (4374
    blocks: 274 batches) and one lane holds several of the best batches (batch t is lane t % 32's): rows whose best
    batches are all lane 0's, rising rows (the best in the second round), random rows."""
    gen = torch.Generator().manual_seed(len(kind) + top_k)
    plan, scores, bufs, want = _select_on_crafted(harness, tmp_path, kind, lengths, 16, 1, 4, 1, top_k, gen, seed=9,
                                                  fused=True, dim=128)
    assert plan.fused_select and plan.n_bat > 32 * S.SELECT_LOADS
    assert torch.equal(bufs["sel"], want), (bufs["sel"] != want).nonzero()[:8]


@pytest.mark.parametrize("wpr", [1, 2, 4, 8])
def test_selection_with_every_warps_per_row(harness, tmp_path, wpr):
    """The select launch with 1, 2, 4 and 8 warps per row (8 / wpr rows per CTA, the last CTA of a kv head
    partly idle: 3 rows per kv head) gives the plain-Python selection exactly, and so do the row's warps merging
    their lists in a tree."""
    gen = torch.Generator().manual_seed(wpr)
    lengths, block, q_len, heads, kv_heads, top_k = [2600, 1700], 16, 1, 6, 2, 8
    batch, rows = len(lengths), heads // kv_heads * q_len
    plan, _, bufs, want = _select_on_crafted(harness, tmp_path, "few-levels-nan", lengths, block, q_len, heads,
                                             kv_heads, top_k, gen, seed=9, select_wpr=wpr)
    assert plan.select_wpr == wpr and plan.n_select_ctas == batch * kv_heads * math.ceil(rows / (S.WARPS // wpr))
    assert torch.equal(bufs["sel"], want), (bufs["sel"] != want).nonzero()[:8]


def test_cases_cover_the_kernel_paths():
    """The cases reach several score ranges, several passes per score warp, several select load rounds, row
    groups, chunks, top_k = 1, fewer candidates than top_k - 1, blocks shared by several rows and rows whose own
    block lies below the sequence's last one."""
    seen = set()
    for p in CASES:
        dtype, dim, block, kv_heads, heads, q_len, lengths, top_k, range_blocks, opts = p.values
        plan = S.plan_split(len(lengths), q_len, heads, kv_heads, dim, block, top_k, max(lengths) + q_len,
                            1, 1, range_blocks=range_blocks)
        pass_blocks = S.WARPS * S.score_batch(dim)
        seen |= {"ranges"} if plan.n_range > 1 else set()
        seen |= {"passes"} if plan.n_range and min(plan.range_blocks, plan.n_cols) > pass_blocks else set()
        seen |= {"select rounds"} if plan.n_cols > 32 * S.WARPS * S.SELECT_LOADS else set()
        seen |= {"row groups"} if plan.n_rg > 1 else set()
        seen |= {"chunks"} if plan.n_chunks > 1 else set()
        seen |= {"own only"} if top_k == 1 else set()
        seen |= {"short"} if top_k - 1 > (min(lengths) + q_len - 1) // block else set()
        seen |= {"shared"} if opts.get("shared") or q_len > 1 else set()
        seen |= {"non-candidates"} if any((n + q_len - 1) // block > n // block for n in lengths) else set()
        page = opts.get("page_size")
        seen |= {"pages of one block"} if page == block else set()
        seen |= {"pages of several blocks"} if page and page > block else set()
        seen |= {"paged chunks"} if page and plan.n_chunks > 1 else set()
    assert seen == {"ranges", "passes", "select rounds", "row groups", "chunks", "own only", "short", "shared",
                    "non-candidates", "pages of one block", "pages of several blocks", "paged chunks"}



# One key element of block 2 infinite or NaN: the block's sum is not finite, so it scores NaN in every precision and
# no query selects it (as moba_topk and the reference do), whichever sign the queries give an infinite product.
@pytest.mark.parametrize("precision", ["fp32", "input"])
@pytest.mark.parametrize("fused_select", [False, True], ids=["select-launch", "selecting-attention"])
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
def test_a_block_with_a_non_finite_key_is_never_selected(request, tmp_path, value, fused_select, precision):
    build = "harness" if precision == "fp32" else "harness_input"
    case = (BF, 64, 16, 1, 8, 1, [400, 250], 4, None, dict(poison_key=value))
    cache, q, top_k, scale, plan, bufs = _run_case(request.getfixturevalue(build), tmp_path, *case,
                                                   fused_select=fused_select, centroid_precision=precision)
    assert plan.fused_select == fused_select
    assert not (bufs["sel"][0] == 2).any(), "the block with a non-finite key was selected"
    assert_step_matches_reference(q, cache, top_k, scale, bufs, block=16, lengths=[400, 250],
                                  centroid_precision=precision)


# A step captured in a CUDA graph is planned for the cache's max_seqlen, since its replays run at whatever lengths the
# cache has reached (the kernels read them from the device): such a plan, for sequences several times longer than
# those held, must give the step of the lengths held (ranges, selection columns and sets beyond every sequence).
@pytest.mark.parametrize(("case", "fused_select"), [
    (CASES[0].values, False), (CASES[0].values, True), (CASES[2].values, None), (CASES[10].values, None),
], ids=["gqa4-ragged-select-launch", "gqa4-ragged-fused-selection", "B128-qlen3-chunks", "paged"])
def test_a_graph_plan_for_max_seqlen_serves_the_lengths_held(harness, tmp_path, monkeypatch, case, fused_select):
    dtype, dim, block, kv_heads, heads, q_len, lengths, top_k, _, opts = case
    cache, q = decode_case(dim + block + heads + q_len, dtype, dim, block, kv_heads, heads, q_len, lengths,
                           spare=5000, **opts)
    top_k, scale = D.check_decode(q, cache, top_k, kernel_limits=True)
    monkeypatch.setattr(MobaKVCache, "_capturing", lambda self: True)
    plan, bufs, launches = S.split_launches(q, cache, top_k, scale, fused_select=fused_select)
    assert plan.n_cols == (cache.max_seqlen - 1) // block >= 2 * (max(lengths) + q_len) // block
    if fused_select is not None:
        assert plan.fused_select == fused_select
    poison(bufs)
    run_emulated(harness, tmp_path, launches, seed=3)
    assert_step_matches_reference(q, cache, top_k, scale, bufs, block=block, lengths=lengths)
    assert not cache._counters.any()
