"""The two-launch decode path (cuda/decode_split.cu) on the CPU: launch plans against the kernel signatures
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
    (1, 16, 32, 1, 64, 512, 32, 5000),
])
def test_plans_fit_the_kernels(batch, q_len, heads, kv_heads, dim, block, top_k, length):
    n_blocks = math.ceil((length + 10) / block)
    plan = S.plan_split(batch, q_len, heads, kv_heads, dim, block, top_k, length, n_blocks, n_blocks * block)
    rows = heads // kv_heads * q_len
    assert plan.rows == rows and plan.n_rg * plan.rows_per_group >= rows
    assert plan.rows_per_group <= S.ROUTE_MAX_ROWS and (plan.n_rg - 1) * plan.rows_per_group < rows
    n_cand = (length - 1) // block
    per_range = plan.tiles_per_range * S.route_tile(dim)
    assert plan.n_range * per_range >= n_cand and (plan.n_range - 1) * per_range < max(n_cand, 1)  # no empty range
    assert plan.n_range == 1 or plan.n_range * plan.lcap <= S.ROUTE_MERGE_ENTRIES
    assert plan.chunk * plan.n_chunks == block and plan.chunk <= S.ATTN_CHUNK and plan.chunk % 16 == 0
    assert plan.top_k * plan.n_chunks <= S.ATTN_ROWS * dim  # the merge's per-warp weights fit the P.V sums
    assert max(plan.route_smem, plan.attn_smem) <= SMEM_MAX
    assert plan.route_smem == S.route_smem_bytes(dim, plan.rows_per_group, top_k, plan.n_range)
    assert plan.n_counters == batch * kv_heads * (plan.n_rg + 1)
    q = torch.zeros(batch, q_len, heads, dim, dtype=torch.bfloat16)
    bufs = {name: torch.zeros(1) for name in ("sel", "part_v", "part_j", "part_o", "part_ml", "out", "lse")}
    route = S.route_launch(plan, q, torch.zeros(1), torch.zeros(1, dtype=torch.int32), bufs, torch.zeros(1))
    attend = S.attend_launch(plan, q, q, q, torch.zeros(1, dtype=torch.int32), bufs, torch.zeros(1), 0.1)
    for launch, ctas, smem in ((route, plan.n_route_ctas, plan.route_smem),
                               (attend, plan.n_attn_ctas, plan.attn_smem)):
        check_args(launch.source, launch.kernel, launch.args)  # exactly the kernel's C types
        assert launch.grid == (ctas, 1, 1) and launch.block == (S.THREADS, 1, 1) and launch.shared_mem == smem
    assert attend.args[-1] == np.float32(0.1 * math.log2(math.e))


def test_benchmark_plans_fill_the_gpu():
    """Batch 8, 32 / 8 heads, d 128, B 128, k 8 on 132 SMs: routing CTAs stream as many 32 KB tiles as keep
    about two waves (7 at 512K: 10 ranges; 8 at 1M; one at 32K and 128K, where there are few tiles), two
    64-token chunks per selected block, and shared memory for the routing / attention CTAs per SM."""
    for length, ranges, tiles in ((512 * 1024, 10, 7), (32 * 1024, 4, 1), (128 * 1024, 16, 1), (1 << 20, 16, 8)):
        n_blocks = length // 128
        plan = S.plan_split(8, 1, 32, 8, 128, 128, 8, length, n_blocks, length, sm_count=132)
        assert (plan.n_range, plan.tiles_per_range) == (ranges, tiles)
        assert plan.n_route_ctas >= 2 * 132 * S.ROUTE_MIN_CTAS or tiles == 1
        assert plan.n_route_ctas == 64 * ranges and plan.n_attn_ctas == 64 * 4 * 8 * 2
        assert S.ROUTE_MIN_CTAS * (plan.route_smem + 1024) <= SMEM_PER_SM
        assert S.ATTN_MIN_CTAS * (plan.attn_smem + 1024) <= SMEM_PER_SM


def test_step_launches_and_buffers():
    g = torch.Generator().manual_seed(0)
    cache = MobaKVCache(2, 2, 64, 16, 80, dtype=torch.bfloat16)
    cache.prefill(torch.randn(2, 70, 2, 64, generator=g).bfloat16(), torch.randn(2, 70, 2, 64, generator=g).bfloat16(),
                  lengths=[70, 40])
    q = torch.randn(2, 1, 8, 64, generator=g).bfloat16()
    plan, bufs, launches = S.split_launches(q, cache, 4, 0.125)
    assert [launch.kernel for launch in launches] == ["moba_decode_route_bf16_d64", "moba_decode_attend_bf16_d64"]
    assert bufs["sel"].shape == (2, 1, 8, 4) and bufs["out"].dtype == torch.bfloat16
    assert bufs["part_o"].numel() == 2 * 2 * plan.rows * 4 * plan.n_chunks * 64
    route_counters, attend_counters = launches[0].args[6], launches[1].args[7]
    assert route_counters.numel() == plan.n_route_counters and attend_counters.numel() == 2 * 2
    assert attend_counters.data_ptr() == route_counters.data_ptr() + 4 * plan.n_route_counters
    assert not cache._counters.any()
    _, _, only = S.split_launches(q, cache, 4, 0.125, route_only=True)
    assert [launch.kernel for launch in only] == ["moba_decode_route_bf16_d64"]


def test_kernel_choice(monkeypatch):
    monkeypatch.delenv(S.ENV_VAR, raising=False)
    # auto (the default): split up to AUTO_SPLIT_MAX_CANDIDATES candidate blocks, fused beyond (as measured)
    assert S.decode_kernel(n_candidates=255) == "split" == S.decode_kernel(n_candidates=S.AUTO_SPLIT_MAX_CANDIDATES)
    assert S.decode_kernel(n_candidates=4095) == "fused" == S.decode_kernel("auto", S.AUTO_SPLIT_MAX_CANDIDATES + 1)
    monkeypatch.setenv(S.ENV_VAR, "split")
    assert S.decode_kernel(n_candidates=4095) == "split" and S.decode_kernel("fused", 3) == "fused"
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
