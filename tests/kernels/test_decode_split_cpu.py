"""The three-launch decode path (cuda/decode_split.cu) on the CPU: launch plans against the kernel signatures
and limits, buffer sizes, and the choice of kernel (``MOBALAB_DECODE_KERNEL``)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mobalab.kernels import MobaKVCache, moba_decode, moba_decode_reference
from mobalab.kernels import _cuda_decode_split as S
from mobalab.kernels._launch import check_args

SMEM_PER_SM = 233472  # H100 / H200: 228 KB per SM, of which 1 KB is reserved per CTA
SMEM_MAX = 232448  # opt-in maximum of one CTA


@pytest.mark.parametrize(("batch", "q_len", "heads", "kv_heads", "dim", "block", "top_k", "length"), [
    (8, 1, 32, 8, 128, 128, 8, 512 * 1024), (8, 1, 32, 8, 128, 64, 4, 128 * 1024), (8, 1, 32, 8, 128, 32, 16, 1 << 20),
    (1, 1, 32, 8, 128, 32, 16, 1 << 20), (64, 1, 32, 8, 128, 128, 8, 32 * 1024), (2, 16, 32, 8, 64, 16, 32, 100_000),
    (1, 16, 32, 1, 128, 512, 2, 700), (3, 2, 4, 4, 64, 16, 1, 5), (1, 16, 32, 1, 128, 16, 32, 1 << 20),
    (1, 16, 32, 1, 64, 512, 32, 5000), (2, 1, 4, 1, 64, 16, 4, 16),
])
def test_plans_fit_the_kernels(batch, q_len, heads, kv_heads, dim, block, top_k, length):
    n_blocks = math.ceil((length + 10) / block)
    plan = S.plan_split(batch, q_len, heads, kv_heads, dim, block, top_k, length, n_blocks, n_blocks * block)
    rows = heads // kv_heads * q_len
    assert plan.rows == rows and plan.n_rg * plan.rows_per_group >= rows
    assert plan.rows_per_group <= S.ROUTE_MAX_ROWS and (plan.n_rg - 1) * plan.rows_per_group < rows
    n_cand = (length - 1) // block
    assert plan.n_cols == max(1, n_cand)
    if top_k == 1 or n_cand == 0:
        assert plan.n_range == 0 and plan.n_score_ctas == 0  # nothing to rank: no score launch
    else:  # whole passes of every warp, no empty range, at most SCORE_MAX_PASSES passes per CTA, about one wave
        assert plan.n_score_ctas <= 132 * S.SCORE_MIN_CTAS or plan.range_blocks == S.SCORE_MAX_PASSES * \
            S.WARPS * S.score_batch(dim) or plan.n_range == 1
        pass_blocks = S.WARPS * S.score_batch(dim)
        assert plan.range_blocks % pass_blocks == 0 and plan.range_blocks <= S.SCORE_MAX_PASSES * pass_blocks
        assert plan.n_range * plan.range_blocks >= n_cand > (plan.n_range - 1) * plan.range_blocks
    # select: one warp per row up to 8 chunks of 32 candidates, else eight
    chunks = math.ceil(max(1, n_cand) / 32)
    assert plan.select_wpr == (1 if chunks <= 8 else 8)
    # the selection inside the attention launch where its rows, entries and set fit (a top per score batch of a row)
    one_wave = plan.n_attn_ctas <= 132 * S.attn_ctas_per_sm(plan.attn_smem)
    fits = plan.n_range > 0 and plan.cached and rows <= 2 * S.ATTN_WARPS and one_wave
    assert plan.fused_select == fits and plan.n_bat == max(1, math.ceil(n_cand / S.score_batch(dim)))
    assert plan.n_select_ctas == batch * kv_heads * math.ceil(rows / (S.WARPS // plan.select_wpr))
    # a completion ticket per kv head; with the selecting launch also a count of its score CTAs' releases
    assert plan.n_counters == batch * kv_heads * (2 if plan.fused_select else 1)
    assert plan.chunk * plan.n_chunks == block and plan.chunk <= S.ATTN_CHUNK and plan.chunk % 16 == 0
    # the merge's per-warp share of the P.V sums and stages (free by then) holds a row's weights and a partial
    # (the tensor-map build: the stages alone)
    stages = S.ATTN_STAGES * 2 * plan.chunk * dim * 2
    per_row = (plan.top_k * plan.n_chunks + 3) & ~3
    for free in (S.ATTN_WARPS * S.ATTN_ROWS * (dim + 2) * 4 + stages, stages):
        share = free // (4 * S.ATTN_WARPS) & ~3
        assert (share - per_row) // dim >= 1
    assert max(plan.score_smem, plan.select_smem, plan.attn_smem) <= SMEM_MAX
    # the attention CTAs per SM the plan counts on (ATTN_MIN_CTAS) where the kv head's entries and query rows are
    # few (q_len 1, 32 / 8 heads, k <= 8, d <= 128: the benchmark's shapes), at least two everywhere
    few = rows * top_k <= 32 and dim <= 128
    assert (S.ATTN_MIN_CTAS if few else 2) * (plan.attn_smem + 1024) <= SMEM_PER_SM
    assert plan.score_smem == S.score_smem_bytes(dim, plan.rows_per_group)
    # the set of selected blocks: one bit per block of the longest sequence
    distinct = min(rows * top_k, (length - 1) // block + 1)
    own_last = (length - 1) // block  # the longest sequence's last block
    assert 32 * plan.n_words > own_last >= 32 * (plan.n_words - 1) and plan.n_table == batch * kv_heads * plan.n_words
    assert 1 <= plan.cpg <= distinct * plan.n_chunks
    assert plan.cached == ((4 * rows * top_k + 15) // 16 * 16 + 2 * rows * dim <= S.ATTN_CACHE)
    q = torch.zeros(batch, q_len, heads, dim, dtype=torch.bfloat16)
    bufs = {name: torch.zeros(1) for name in ("sel", "scores", "tops", "part_o", "part_ml", "out", "lse")}
    lengths = torch.zeros(1, dtype=torch.int32)
    score = S.score_launch(plan, q, torch.zeros(1), lengths, bufs)
    table = torch.zeros(1, dtype=torch.int32)
    select = S.select_launch(plan, lengths, bufs, table)
    counters = torch.zeros(plan.n_counters, dtype=torch.int32)
    attend = S.attend_launch(plan, q, q, q, lengths, bufs, counters, table, 0.1)
    assert select.args[3] is table and select.args[-2:] == (plan.n_words, plan.select_wpr)
    assert S.select_launch(plan, lengths, bufs).args[-2] == 0  # the routing alone: no set
    # the fused plan: the score pass writes the batch tops, the attention launch reads them and the scores
    # (the kernels with and without the selection are separate entry points, so that each is its own machine code)
    scale_log2 = np.float32(0.1 * math.log2(math.e))
    if plan.fused_select:
        assert score.kernel == f"moba_decode_route_score_tops_bf16_d{dim}" and attend.kernel == \
            f"moba_decode_attend_select_bf16_d{dim}"
        assert score.args[14] is bufs["tops"] and score.args[15] == plan.n_bat and score.args[16] == 0
        assert attend.args[21] == scale_log2 and attend.args[22] is bufs["scores"] and attend.args[23] is bufs["tops"]
        assert attend.args[24:26] == (plan.n_cols, plan.n_bat)
        # the score CTAs' releases: the counters after the completion tickets, one count per CTA of a kv head
        released = attend.args[26]
        assert released.data_ptr() == counters.data_ptr() + 4 * batch * kv_heads and released.numel() == \
            batch * kv_heads and attend.args[27] == plan.n_rg * plan.n_range
    else:
        assert score.kernel == f"moba_decode_route_score_bf16_d{dim}" and len(score.args) == 14
        assert attend.kernel == f"moba_decode_attend_bf16_d{dim}"
        assert attend.args[21:23] == (plan.cached, scale_log2)
    for launch, ctas, smem, threads in ((score, plan.n_score_ctas, plan.score_smem, S.THREADS),
                                        (select, plan.n_select_ctas, plan.select_smem, S.THREADS),
                                        (attend, plan.n_attn_ctas, plan.attn_smem, S.ATTN_THREADS)):
        check_args(launch.source, launch.kernel, launch.args)  # exactly the kernel's C types
        assert launch.grid == (ctas, 1, 1) and launch.block == (threads, 1, 1) and launch.shared_mem == smem
    # the tensor maps of K and V (here q's tensor): rows of d elements, boxes of one item's rows by 64 columns
    for tmap in attend.args[-2:]:
        assert (tmap.rows, tmap.cols, tmap.box_rows, tmap.box_cols) == (q.numel() // dim, dim, plan.chunk, 64)


def test_benchmark_plans_fill_the_gpu():
    """Batch 8, 32 / 8 heads, d 128, B 128, k 8 on 132 SMs: score CTAs of whole passes (128 blocks, one batch of
    16 per warp) sized for about one wave of 264 slots (512K: 4 ranges of 1024 blocks, 256 CTAs; 1M: 4 of 2048;
    128K: 4 of 256; 32K: 2 of 128, one pass each), one select warp per row at 32K and eight beyond, two 64-token
    chunks per selected block, and shared memory for the CTAs per SM their launch bounds promise; six attention
    CTAs per (sequence, kv head), one wave of three per SM."""
    for length, ranges, blocks in ((512 * 1024, 4, 1024), (32 * 1024, 2, 128), (128 * 1024, 4, 256),
                                   (1 << 20, 4, 2048)):
        n_blocks = length // 128
        plan = S.plan_split(8, 1, 32, 8, 128, 128, 8, length, n_blocks, length, sm_count=132)
        assert (plan.n_range, plan.range_blocks) == (ranges, blocks)
        assert plan.n_score_ctas == 64 * ranges
        assert plan.select_wpr == {512 * 1024: 8, 32 * 1024: 1, 128 * 1024: 8, 1 << 20: 8}[length]
        assert plan.fused_select  # the attention CTAs (one wave) select: two launches
        assert plan.n_select_ctas == 64 * math.ceil(4 / (S.WARPS // plan.select_wpr))
        assert plan.n_attn_ctas == 64 * 6 and plan.cpg == 6 and plan.cached and plan.n_chunks == 2
        assert S.SCORE_MIN_CTAS * (plan.score_smem + 1024) <= SMEM_PER_SM
        assert S.SELECT_MIN_CTAS * (plan.select_smem + 1024) <= SMEM_PER_SM
        assert S.ATTN_MIN_CTAS * (plan.attn_smem + 1024) <= SMEM_PER_SM


def test_scores_scratch_stays_small_at_the_targets():
    """The scratch is R * n_c fp32 per (sequence, kv head): 4.2 MB at 512K (b 8, 32 / 8 heads, B 128), against
    134 MB of block sums, so it stays in the 50 MB L2 between the score and select launches."""
    plan = S.plan_split(8, 1, 32, 8, 128, 128, 8, 512 * 1024, 4096, 512 * 1024)
    bufs = S.split_buffers(plan, "cpu", torch.bfloat16)
    assert bufs["scores"].numel() * 4 == 8 * 8 * 4 * 4095 * 4
    assert bufs["scores"].numel() * 4 < 0.04 * 8 * 8 * 4095 * 128 * 4
    one = S.plan_split(2, 1, 4, 1, 64, 16, 1, 500, 40, 640)  # top_k 1: no score launch, a one-element scratch
    assert S.split_buffers(one, "cpu", torch.bfloat16)["scores"].numel() == 1


def _bf16_step(seed: int):
    """A bf16 cache of 2 sequences (70 and 40 tokens, 2 kv heads, d 64, B 16) and one step's queries (8 heads)."""
    g = torch.Generator().manual_seed(seed)
    cache = MobaKVCache(2, 2, 64, 16, 80, dtype=torch.bfloat16)
    cache.prefill(torch.randn(2, 70, 2, 64, generator=g).bfloat16(), torch.randn(2, 70, 2, 64, generator=g).bfloat16(),
                  lengths=[70, 40])
    return cache, torch.randn(2, 1, 8, 64, generator=g).bfloat16()


def test_step_launches_and_buffers():
    cache, q = _bf16_step(0)
    fused, _, two_launches = S.split_launches(q, cache, 4, 0.125)
    assert fused.fused_select and [launch.kernel for launch in two_launches] == [
        "moba_decode_route_score_tops_bf16_d64", "moba_decode_attend_select_bf16_d64"]
    plan, bufs, launches = S.split_launches(q, cache, 4, 0.125, fused_select=False)
    assert [launch.kernel for launch in launches] == ["moba_decode_route_score_bf16_d64", "moba_decode_route_select",
                                                      "moba_decode_attend_bf16_d64"]
    assert bufs["sel"].shape == (2, 1, 8, 4) and bufs["out"].dtype == torch.bfloat16
    assert bufs["scores"].numel() == 2 * 2 * 4 * (69 // 16)
    assert bufs["part_o"].numel() == 2 * 2 * plan.rows * 4 * plan.n_chunks * 64
    table, attend_counters = launches[2].args[5], launches[2].args[8]
    assert attend_counters.numel() == 2 * 2 and not cache._counters.any()
    # the selecting launch: the score CTAs release a second counter per kv head, after the completion tickets
    fused_counters, fused_table = two_launches[1].args[8], two_launches[1].args[5]
    assert fused_counters.numel() == 2 * 2 * 2 and two_launches[0].args[16].data_ptr() == \
        two_launches[1].args[26].data_ptr() == fused_counters.data_ptr() + 4 * 2 * 2
    assert fused_table.data_ptr() == fused_counters.data_ptr() + 4 * 2 * 2 * 2
    # the select launch fills the sets the attention launch reads: one zeroed workspace behind the counters
    assert launches[1].args[3] is table and table.numel() == plan.n_table == 2 * 2 * plan.n_words
    assert table.data_ptr() == attend_counters.data_ptr() + 4 * 2 * 2 and not table.any()
    _, _, only = S.split_launches(q, cache, 4, 0.125, route_only=True)
    assert [launch.kernel for launch in only] == ["moba_decode_route_score_tops_bf16_d64", "moba_decode_route_select"]
    assert only[1].args[-2] == 0 and only[0].args[16] == 0  # the routing alone fills no set, releases nothing
    plan2, _, two = S.split_launches(q, cache, 4, 0.125, select_wpr=2, fused_select=False)  # measurement overrides
    assert plan2.select_wpr == 2 and two[1].args[-1] == 2 and two[1].grid == (2 * 2 * math.ceil(4 / 4), 1, 1)
    _, _, top1 = S.split_launches(q, cache, 1, 0.125)
    assert [launch.kernel for launch in top1] == ["moba_decode_route_select", "moba_decode_attend_bf16_d64"]


def test_input_precision_score_pass_streams_the_16_bit_means():
    """centroid_precision "input": the score launch streams the cache's bf16 block means (half the sums' bytes),
    built with the input define; "fp32" streams the sums; a score launch given rows of the wrong type is refused."""
    cache, q = _bf16_step(1)
    plan, bufs, launches = S.split_launches(q, cache, 4, 0.125)
    assert launches[0].args[1] is cache.block_sums and launches[0].defines == ()
    _, _, launches = S.split_launches(q, cache, 4, 0.125, centroid_precision="input")
    assert launches[0].args[1] is cache._means and cache._means.dtype == torch.bfloat16
    assert launches[0].defines == ("MOBA_DECODE_CENTROIDS_INPUT=1",)
    with pytest.raises(ValueError, match=r"centroid_precision='input' streams torch.bfloat16 block rows, got "
                                         r"torch.float32"):
        S.score_launch(plan, q, cache.block_sums, cache._len_dev, bufs, centroid_precision="input")
    with pytest.raises(ValueError, match=r"centroid_precision='fp32' streams torch.float32 block rows, got "
                                         r"torch.bfloat16"):
        S.score_launch(plan, q, cache._means, cache._len_dev, bufs)


def test_kernel_choice(monkeypatch):
    monkeypatch.delenv(S.ENV_VAR, raising=False)
    # auto (the default): the split kernel at every length
    assert S.decode_kernel() == "split" == S.decode_kernel("auto")
    monkeypatch.setenv(S.ENV_VAR, "fused")
    assert S.decode_kernel() == "fused" and S.decode_kernel("split") == "split"
    monkeypatch.setenv(S.ENV_VAR, "split")
    assert S.decode_kernel() == "split" and S.decode_kernel("fused") == "fused"
    monkeypatch.setenv(S.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="MOBALAB_DECODE_KERNEL = 'fast' is not a decode kernel; supported: fused, "
                                         "split, auto"):
        S.decode_kernel()
    with pytest.raises(ValueError, match="kernel = 'x' is not a decode kernel"):
        S.decode_kernel("x")


def test_cpu_decode_ignores_the_kernel_choice(monkeypatch):
    """CPU tensors always run the reference, whatever MOBALAB_DECODE_KERNEL says."""
    monkeypatch.setenv(S.ENV_VAR, "split")
    g = torch.Generator().manual_seed(1)
    cache = MobaKVCache(1, 1, 8, 4, 24)
    cache.prefill(torch.randn(1, 20, 1, 8, generator=g), torch.randn(1, 20, 1, 8, generator=g))
    q = torch.randn(1, 1, 2, 8, generator=g)
    assert torch.equal(moba_decode(q, cache, 3), moba_decode_reference(q, cache, 3))


def test_dependent_launch_goes_through_launch_kernel_ex(monkeypatch):
    """A plan marked ``dependent`` is launched by cuLaunchKernelEx with one attribute, programmatic stream
    serialization, and the plan's geometry, stream and parameter block (the structs laid out as cuda.h's); a
    thread without a current context gets False back (the caller's fallback), other errors raise. On the CPU
    ``split_launches`` marks nothing (there is no GPU to launch on)."""
    import ctypes
    import dataclasses
    import types

    from mobalab.kernels import _launch

    assert ctypes.sizeof(_launch._LaunchAttr) == 72 and _launch._LaunchAttr.value.offset == 8
    assert ctypes.sizeof(_launch._LaunchConfig) == 56 and _launch._LaunchConfig.stream.offset == 32
    assert _launch._LaunchConfig.attrs.offset == 40 and _launch._LaunchConfig.num_attrs.offset == 48
    seen, answer = [], [0]

    def launch_ex(config, f, params, extra):
        c = config._obj
        attr = c.attrs[0]
        seen.append((tuple(c.grid), tuple(c.block), c.shared_mem, c.stream, c.num_attrs, attr.id,
                     attr.value.programmatic, f.value, params.value, extra))
        return answer[0]

    monkeypatch.setattr(_launch, "_launch_kernel_ex", lambda: launch_ex)
    monkeypatch.setattr(_launch, "cupy", lambda: types.SimpleNamespace(cuda=types.SimpleNamespace(driver=None)))
    g = torch.Generator().manual_seed(0)
    cache = MobaKVCache(2, 2, 64, 16, 80, dtype=torch.bfloat16)
    cache.prefill(torch.randn(2, 70, 2, 64, generator=g).bfloat16(), torch.randn(2, 70, 2, 64, generator=g).bfloat16())
    q = torch.randn(2, 1, 8, 64, generator=g).bfloat16()
    for dependent in (None, True):
        plan, _, launches = S.split_launches(q, cache, 4, 0.125, dependent=dependent)
        assert plan.fused_select and not any(x.dependent for x in launches)
    attend = dataclasses.replace(launches[-1], dependent=True)
    cargs = check_args(attend.source, attend.kernel, attend.args)
    assert _launch._driver_launch(4321, attend, cargs, 77)
    (grid, block, smem, stream, n_attrs, attr_id, programmatic, f, params, extra), = seen
    _, _, _, params_addr = _launch._BLOCKS.get(attend.source, attend.kernel)
    assert grid == (attend.grid[0], 1, 1) and block == (attend.block[0], 1, 1) and smem == attend.shared_mem
    assert (stream, n_attrs, attr_id, programmatic, f, params, extra) == (
        77, 1, _launch.ATTR_PROGRAMMATIC_STREAM_SERIALIZATION, 1, 4321, params_addr, None)
    answer[0] = _launch._INVALID_CONTEXT
    assert not _launch._driver_launch(4321, attend, cargs, 77)
    answer[0] = 1
    with pytest.raises(RuntimeError, match="cuLaunchKernelEx .* CUresult 1"):
        _launch._driver_launch(4321, attend, cargs, 77)


def test_only_the_selecting_kernels_wait_for_their_launch():
    """The programmatic dependency in the source: the tops-writing score kernel lets the next launch start, the
    selecting attention kernels wait before they read the scores, and the three-launch kernels do neither (their
    launches are ordinary ones)."""
    from mobalab.kernels._build import source

    text = source("decode_split.cu")
    for macro, trigger, wait in (("MOBA_DECODE_SCORE_TOPS_KERNEL", True, False),
                                 ("MOBA_DECODE_SCORE_KERNEL", False, False)):
        body = text[text.index(f"#define {macro}("):]
        body = body[:body.index("\n\n")]
        assert ("dec_grid_launch_dependents()" in body) == trigger and ("dec_grid_wait()" in body) == wait, macro
    attend = text[text.index("__device__ __forceinline__ void dsp_attend("):]
    select_block = attend[attend.index("if constexpr (SELECT) {"):]
    # either wait (the whole score launch, or the kv head's release counter of a DSP_OWN_WAIT build) comes before
    # the first load of the tops and the selection, and the counter's wait is followed by a CTA barrier
    for wait in ("dec_grid_wait();", "dec_wait_at_least(released + g, (unsigned)n_score);\n        __syncthreads();"):
        wait_at = select_block.index(wait)
        assert wait_at < select_block.index("dsp_ld_score(tops") < select_block.index("dsp_select_row_tops(")
    assert attend.count("dec_grid_wait()") == 1
    # the score CTAs release their kv head's counter after a barrier that follows their last store, early-ending
    # CTAs too
    score = text[text.index("__device__ __forceinline__ void dsp_score("):]
    score = score[:score.index("\n}\n")]
    assert score.count("dec_release_add(released + bk)") == 2
    assert score.rindex("__syncthreads();\n        if (tid == 0) dec_release_add(released + bk);") > \
        score.rindex("tops[")


def test_a_plan_beyond_one_grid_names_the_launch_that_overflows():
    """2^20 sequences of 8 kv heads with 512 query rows each: one select CTA per row is 2^32 CTAs, while the
    attention launch (63 CTAs per kv head) and the score launch fit; the error names the select launch and the shape
    that made it."""
    length = 16 * 1001 + 1
    with pytest.raises(ValueError, match=r"batch 1048576, kv_heads 8, 512 query rows per kv head and 1001 candidate "
                                         r"blocks take 4294967296 select CTAs; one grid holds at most 2147483647"):
        S.plan_split(1 << 20, 16, 256, 8, 64, 16, 2, length, 1002, 1002 * 16)


def test_queries_reach_the_kernels_contiguous_and_16_byte_aligned():
    """The attention kernel loads query rows as 16-byte vectors: a contiguous q that starts 6 bytes past such an
    address (a view into a flat buffer) is copied, as a non-contiguous one is; an aligned contiguous q is passed on."""
    from mobalab.kernels._cuda_decode import kernel_queries

    flat = torch.randn(3 + 2 * 4 * 64).bfloat16()
    shifted = flat[3:].view(2, 1, 4, 64)
    assert shifted.is_contiguous() and shifted.data_ptr() % 16 == 6
    for q in (shifted, torch.randn(2, 4, 1, 64).bfloat16().transpose(1, 2)):
        got = kernel_queries(q)
        assert got.is_contiguous() and got.data_ptr() % 16 == 0 and torch.equal(got, q)
    aligned = torch.randn(2, 1, 4, 64).bfloat16()
    assert kernel_queries(aligned) is aligned


def test_a_step_starts_no_launch_before_every_launch_is_ready(monkeypatch):
    """A step whose attention kernel cannot be built (or whose arguments are refused) starts none of its launches:
    a score launch that ran alone would leave its release counters raised in the cache's workspace for the next
    step. A step whose launches are all ready starts them in order."""
    from mobalab.kernels import _cuda_decode as F
    from mobalab.kernels import _launch

    cache, q = _bf16_step(2)
    _, _, launches = S.split_launches(q, cache, 4, 0.125)
    assert len(launches) == 2
    started = []
    monkeypatch.setattr(_launch, "start", lambda fn, launch, cargs: started.append((fn, launch.kernel)))

    def build(source, kernel, device_index, smem, defines=()):
        if "attend" in kernel:
            raise RuntimeError(f"{kernel} failed to build")
        return kernel

    monkeypatch.setattr(F, "_function", build)
    with pytest.raises(RuntimeError, match="attend_select_bf16_d64 failed to build"):
        F.run_all(launches, 0)
    assert started == []
    monkeypatch.setattr(F, "_function", lambda source, kernel, *rest: kernel)
    F.run_all(launches, 0)
    assert started == [(x.kernel, x.kernel) for x in launches]
