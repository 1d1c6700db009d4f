"""Shard layouts (which positions a rank holds) and the ring communication model."""

import math

import numpy as np
import pytest
import torch

from mobalab.distributed import ring_step_model, shard_positions
from mobalab.distributed._layout import Layout
from mobalab.distributed._model import _attended_keys, _routing_pairs, _scored_before


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("lengths", [(5,), (3, 3), (1, 7, 2), (4, 1, 6, 9), (2, 2, 2, 2, 2)])
def test_shards_cover_the_sequence_once(lengths, layout):
    positions = [shard_positions(lengths, r, layout) for r in range(len(lengths))]
    assert [len(p) for p in positions] == list(lengths)
    assert torch.equal(torch.cat(positions).sort().values, torch.arange(sum(lengths)))
    for r, p in enumerate(positions):
        segments = Layout(tuple(lengths), layout).segments(r)
        assert torch.equal(p, torch.cat([torch.arange(s.start, s.end) for s in segments]))
        assert [s.local for s in segments] == [sum(s.length for s in segments[:i]) for i in range(len(segments))]


def test_zigzag_pairs_early_and_late_pieces():
    # 4 ranks, 4 tokens each: pieces of 2, rank r holds pieces r and 7 - r
    assert [shard_positions([4] * 4, r, "zigzag").tolist() for r in range(4)] == [
        [0, 1, 14, 15], [2, 3, 12, 13], [4, 5, 10, 11], [6, 7, 8, 9]]


def test_layout_validation():
    with pytest.raises(ValueError, match="layout must be one of"):
        shard_positions([2, 2], 0, "striped")
    with pytest.raises(ValueError, match="rank must be an integer in 0..1"):
        shard_positions([2, 2], 2)
    with pytest.raises(ValueError, match="at least one token"):
        shard_positions([2, 0], 0)
    with pytest.raises(TypeError, match="lengths must be a sequence of integers"):
        shard_positions(None, 0)


def test_shard_lengths_must_be_integers_and_listed():
    # int() made a length of 2.7 two tokens, and "33" two shards of 3
    for lengths in ([2.7, 3], "33", [True, 2], torch.tensor([2.0, 3.0])):
        with pytest.raises(TypeError, match="lengths must be a sequence of integers"):
            shard_positions(lengths, 0)
    with pytest.raises(ValueError, match="lengths must list the shard length of every rank, got an empty"):
        shard_positions([], 0)
    assert shard_positions(np.array([3, 3]), np.int64(1)).tolist() == [3, 4, 5]
    assert shard_positions(torch.tensor([3, 3]), 1, "zigzag").tolist() == [2, 3, 4]
    assert shard_positions((n for n in (3, 3)), 0).tolist() == [0, 1, 2]


def test_counting_helpers_against_brute_force():
    for n, block, top_k in [(37, 8, 3), (64, 16, 8), (5, 8, 2), (100, 7, 1)]:
        t = np.arange(n)
        own = t // block
        keys = (t - own * block + 1) + np.minimum(own, top_k - 1) * block
        assert _attended_keys(n, block, top_k, True) == keys.sum()
        assert _scored_before(n, block) == own.sum()
        for layout in ("contiguous", "zigzag"):
            lay = Layout((n // 3, n // 3, n - 2 * (n // 3)), layout)
            assert sum(_routing_pairs(lay, r, block, True) for r in range(3)) == own.sum()
            assert sum(_routing_pairs(lay, r, block, False) for r in range(3)) == n * math.ceil(n / block)


def test_model_bytes_and_ratios():
    df = ring_step_model([1 << 20, 1 << 22], [1, 2, 8], heads=16, head_dim=128, links={"nv": 450.0})
    two = df[(df.gpus == 2) & (df.seq_len == 1 << 20)].iloc[0]
    shard = 1 << 19
    assert two.fwd_bytes_step == 2 * shard * 16 * 128 * 2  # K and V, bf16
    assert two.bwd_bytes_step == 2 * shard * 16 * 128 * (2 + 2)  # plus dK, dV in bf16
    # compute / comm per step does not depend on N and falls as 1/R
    for col in ("fwd_ratio", "bwd_ratio"):
        by = df.set_index(["seq_len", "gpus"])[col]
        assert by[(1 << 22, 2)] == pytest.approx(by[(1 << 20, 2)], rel=1e-3)
        assert by[(1 << 20, 2)] == pytest.approx(4 * by[(1 << 20, 8)], rel=1e-3)
    # the forward ratio in closed form: h S W / (g F R) * 2 / e, S the mean attended keys
    mean_keys = _attended_keys(1 << 20, 128, 8, True) / (1 << 20)
    assert two.fwd_ratio == pytest.approx(mean_keys * 450e9 / (111e12 * 2), rel=1e-9)
    one = df[(df.gpus == 1) & (df.seq_len == 1 << 20)].iloc[0]
    assert one.speedup == pytest.approx(1.0) and math.isinf(one.fwd_ratio) and not one.comm_bound
    assert bool(df[(df.gpus == 8)].comm_bound.all()) and not two.comm_bound


def test_model_gqa_zigzag_and_links():
    gqa = ring_step_model([1 << 20], [8], heads=16, kv_heads=4, links={"nv": 450.0}).iloc[0]
    mha = ring_step_model([1 << 20], [8], heads=16, links={"nv": 450.0}).iloc[0]
    assert gqa.fwd_ratio == pytest.approx(4 * mha.fwd_ratio)  # 4x fewer K/V bytes per step
    zig = ring_step_model([1 << 20], [8], layout="zigzag", links={"nv": 450.0}).iloc[0]
    assert zig.routing_ms < 0.6 * mha.routing_ms  # the last contiguous shard routes (2R - 1) / R x the mean
    slow = ring_step_model([1 << 20], [2], links={"ib": 50.0, "nv": 450.0})
    assert list(slow.link) == ["ib", "nv"] and slow.total_ms.iloc[0] > slow.total_ms.iloc[1]


def test_model_validation():
    with pytest.raises(ValueError, match="heads \\(16\\) must be a multiple of kv_heads \\(3\\)"):
        ring_step_model([1024], [2], kv_heads=3)
    with pytest.raises(ValueError, match="each GPU count must be an integer > 0"):
        ring_step_model([1024], [0])
    with pytest.raises(ValueError, match="forward_tflops must be a finite number > 0"):
        ring_step_model([1024], [2], forward_tflops=-1)
    with pytest.raises(ValueError, match="4 GPUs need at least 4 tokens"):
        ring_step_model([3], [4])
    with pytest.raises(ValueError, match="layout must be one of"):
        ring_step_model([1024], [2], layout="x")


def test_model_refuses_infinite_rates_and_empty_lists_and_takes_single_values():
    # an infinite bandwidth made the compute / comm ratio a ZeroDivisionError
    with pytest.raises(ValueError, match=r"links\['x'\] must be a finite number > 0, got inf"):
        ring_step_model([1024], [2], links={"x": math.inf})
    with pytest.raises(ValueError, match="routing_tflops must be a finite number > 0, got inf"):
        ring_step_model([1024], [2], routing_tflops=math.inf)
    with pytest.raises(ValueError, match="seq_lens must list at least one value"):
        ring_step_model([], [2])
    with pytest.raises(ValueError, match="n_gpus must be an integer or a sequence of integers, got None"):
        ring_step_model([1024], None)
    one = ring_step_model(1 << 20, 2, links={"nv": 450.0})
    assert one.equals(ring_step_model([1 << 20], [2], links={"nv": 450.0}))


def test_head_groups_take_whole_kv_groups_and_fit_the_budget():
    from mobalab.distributed._ring import head_groups, ring_bytes_per_token

    assert head_groups(1, 1000, 8, 2, 64, 2, budget=1 << 40) == [(0, 8)]
    assert head_groups(1, 1000, 8, 2, 64, 2, budget=1) == [(0, 4), (4, 8)]  # one kv head (4 query heads) a pass
    per_token = ring_bytes_per_token(16, 16, 128, 2)
    for shard, budget in [(1 << 19, 8 << 30), (1 << 20, 8 << 30), (3 << 20, 1 << 30)]:
        ranges = head_groups(1, shard, 16, 16, 128, 2, budget=budget)
        width = ranges[0][1] - ranges[0][0]
        assert 16 % width == 0 and ranges == [(h, h + width) for h in range(0, 16, width)]
        assert width == 1 or shard * per_token * width / 16 <= budget
        if width < 16:  # the fewest passes: twice the width would not fit
            assert shard * per_token * 2 * width / 16 > budget


def test_forward_takes_one_pass_when_it_fits_else_groups_by_its_own_bytes():
    from mobalab.distributed._ring import (
        forward_bytes_per_token,
        forward_head_groups,
        head_groups,
        ring_bytes_per_token,
    )

    whole = forward_bytes_per_token(16, 16, 128, 2, sliced=False)
    assert whole < forward_bytes_per_token(16, 16, 128, 2) < 0.5 * ring_bytes_per_token(16, 16, 128, 2)
    assert forward_head_groups(1, 1 << 20, 16, 16, 128, 2, budget=(1 << 20) * whole) == [(0, 16)]
    split = forward_head_groups(1, 1 << 20, 16, 16, 128, 2, budget=(1 << 20) * whole - 1)
    assert len(split) > 1 and split == head_groups(1, 1 << 20, 16, 16, 128, 2, budget=(1 << 20) * whole - 1,
                                                   per_token=forward_bytes_per_token)
    width = split[0][1] - split[0][0]
    assert (1 << 20) * forward_bytes_per_token(16, 16, 128, 2) * width / 16 <= (1 << 20) * whole - 1


def test_bench_refuses_settings_it_cannot_run_before_running():
    """Settings that used to fail deep inside a run (a traceback on every rank) are refused with what was given."""
    from mobalab.distributed import bench

    for argv in (["--reps", "0"], ["--warmup", "-1"], ["--heads", "0"], ["--lengths", "-5"], ["--lengths", "1.5M"]):
        with pytest.raises(SystemExit):
            bench.parse_args(argv)
    assert bench.parse_args(["--lengths", "2k, 1M,0", "--warmup", "0"]).lengths == [2048, 1 << 20, 0]

    def refusal(argv, world):
        return bench._refusal(bench._defaults(bench.parse_args(argv), gpu=False), world)

    # the CPU default halves the heads for GQA: one head made zero kv heads, five heads two
    for heads in (1, 5, 6):
        args = bench._defaults(bench.parse_args(["--heads", str(heads)]), gpu=False)
        assert heads % args.kv_heads == 0 and args.kv_heads == (heads // 2 if heads % 2 == 0 else heads)
    assert refusal(["--heads", "6", "--kv-heads", "4"], 2) == "--heads (6) must be a multiple of --kv-heads (4)"
    assert refusal(["--check-len", "3", "--lengths", "8,2"], 4) == (
        "every length needs at least one token per process (4), got 3, 2")
    assert refusal(["--check-len", "0", "--lengths", "4"], 4) is None
    assert refusal(["--path", "single-device"], 2) == "--path single-device runs in one process, not 2"


def test_bench_predicts_that_4m_tokens_fit_two_h200s_but_not_one():
    """The bench runs a length only if its predicted peak fits (else forward only, or skip): at the reference
    configuration a 2M-token shard must be predicted to fit an H200 (141 GB), a whole 4M sequence not."""
    from mobalab.distributed import bench

    args = bench._defaults(bench.parse_args(["--backend", "nccl"]), gpu=True)
    h200 = bench.MEMORY_FRACTION * 141e9
    for device in (None, 141e9):  # passes in the fixed budget; or, on the H200, one pass where it fits
        assert bench._predicted_bytes(2 << 20, args, 2, backward=True, device_bytes=device) < h200
        assert bench._predicted_bytes(4 << 20, args, 2, backward=True, device_bytes=device) > h200
    # a 1M-token shard takes one backward pass over all heads on an H200: more memory, still well inside
    assert bench._predicted_bytes(1 << 20, args, 2, backward=True, device_bytes=141e9) > \
        bench._predicted_bytes(1 << 20, args, 2, backward=True) + 30e9


def test_backward_takes_one_pass_on_a_gpu_where_it_fits_with_batch_one():
    from mobalab.distributed._ring import BACKWARD_MEMORY_SHARE, backward_head_groups, head_groups, ring_bytes_per_token

    whole = (1 << 20) * ring_bytes_per_token(16, 16, 128, 2, sliced=False, kernel_scratch=False)
    device = whole / BACKWARD_MEMORY_SHARE
    assert backward_head_groups(1, 1 << 20, 16, 16, 128, 2, device) == [(0, 16)]
    for args in ((1, 1 << 20, 16, 16, 128, 2, device * 0.99), (2, 1 << 19, 16, 16, 128, 2, device),
                 (1, 1 << 20, 16, 16, 128, 2, None)):  # too little memory; batch 2 (pieces); no GPU
        assert backward_head_groups(*args) == head_groups(*args[:6]) != [(0, 16)]
