"""The decode benchmark with both decode kernels (fused and split) on the CPU: its table, targets and the
Nsight Compute command of the split path."""

from __future__ import annotations

import math
import sys

from mobalab.bench import decode as bench

K = 1024


def _row(n, kernel, ms, frac):
    return dict(seq_len=n, batch=8, block_size=128, top_k=8, kernel=kernel, mobalab_ms=ms, routing_ms=ms / 2,
                mobalab_eager_ms=ms * 3, sdpa_flash_ms=4.0, sdpa_cudnn_ms=math.nan, sdpa_efficient_ms=8.0,
                dense_best="flash", dense_best_ms=4.0, flex_ms=math.nan, speedup_vs_dense=4.0 / ms, bytes_needed=2e8,
                centroid_bytes=1.3e8, kv_bytes=7e7, unique_blocks=28.0, mobalab_tbps=3.4, roofline_fraction=frac,
                dense_tbps=4.0, copy_tbps=4.3)


def test_two_kernels_give_two_rows_and_targets_each():
    rows = [_row(512 * K, "fused", 0.175, 0.35), _row(512 * K, "split", 0.1, 0.72)]
    got = bench.targets(rows)
    speed = [(what, met) for what, _, _, met in got if what.startswith("512K")]
    assert [("fused" in w, met) for w, met in speed] == [(True, False), (False, True)]
    roof = {what.split(",")[2].strip(): met for what, _, _, met in got if what.startswith("HBM roofline")}
    assert roof == {"fused kernel (worst: 512K b8 B128 k8)": False, "split kernel (worst: 512K b8 B128 k8)": True}
    table = bench.markdown(rows, {"cuda_device": "GPU", "utc": "now", "git_commit": "abc"})
    assert "| kernel |" in table and table.count(" | fused |") == 1 and table.count(" | split |") == 1
    assert "kernel" in bench.COLUMNS


def test_kernel_option_and_split_ncu_command():
    args = bench.build_parser().parse_args(["--quick", "--kernel", "split"])
    assert args.kernel == "split" and bench.KERNEL_CHOICES["both"] == ("fused", "split")
    assert bench.build_parser().parse_args(["--quick"]).kernel is None  # both for the benchmark, fused for ncu
    cmd = bench.ncu_command("/tmp/r", 32 * K, 8, kernel="split")
    assert cmd[cmd.index("--kernel-name") + 1] == "regex:moba_decode_(route|attend)"
    assert int(cmd[cmd.index("--launch-skip") + 1]) == 3 * (bench.PROFILE_STEPS - 1)  # score, select, attend
    assert cmd[cmd.index("--launch-count") + 1] == "3"
    prog = cmd[cmd.index(sys.executable):]
    assert prog[-2:] == ["--kernel", "split"] and bench.build_parser().parse_args(prog[3:]).kernel == "split"
