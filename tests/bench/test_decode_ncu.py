"""The Nsight Compute step of the decode benchmark on the CPU: its command line and its summary parser."""

from __future__ import annotations

import csv
import io
import sys

import pytest

from mobalab.bench import decode as bench


def test_ncu_command_profiles_one_step_kernel_launch_after_warm_up():
    cmd = bench.ncu_command("/tmp/r", 512 * 1024, 8)
    assert cmd[:3] == ["ncu", "--clock-control", "none"]
    assert cmd[cmd.index("--kernel-name") + 1] == "regex:moba_decode_step"
    assert int(cmd[cmd.index("--launch-skip") + 1]) == bench.PROFILE_STEPS - 1
    assert cmd[cmd.index("--launch-count") + 1] == "1"
    sections = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--section"]
    assert sections == ["SpeedOfLight", "MemoryWorkloadAnalysis", "Occupancy", "WarpStateStats", "LaunchStats",
                        "SchedulerStats"]
    prog = cmd[cmd.index(sys.executable):]
    assert prog[1:] == ["-m", "mobalab.bench.decode", "--profile", "--seq-len", "524288", "--batch", "8"]
    args = bench.build_parser().parse_args(prog[3:])
    assert args.profile and args.seq_len == 524288 and args.batch == 8 and args.block_size == 128 and args.top_k == 8


def _raw(metrics: dict[str, tuple[str, str]]) -> str:
    out = io.StringIO()
    w = csv.writer(out, quoting=csv.QUOTE_ALL)
    w.writerow(["ID", "Kernel Name", *metrics])
    w.writerow(["", "", *(u for u, _ in metrics.values())])
    w.writerow(["0", "moba_decode_step_bf16_d128", *(v for _, v in metrics.values())])
    return out.getvalue()


def test_ncu_summary_reads_the_raw_page():
    text = _raw({
        "gpu__time_duration.sum": ("ns", "120,000"),
        "dram__bytes_read.sum": ("byte", "250000000"),
        "dram__bytes_write.sum": ("byte", "2000000"),
        "dram__throughput.avg.pct_of_peak_sustained_elapsed": ("%", "45.5"),
        "sm__warps_active.avg.pct_of_peak_sustained_active": ("%", "22.25"),
        "launch__registers_per_thread": ("register/thread", "127"),
        "launch__grid_size": ("", "264"),
        "smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio": ("inst", "3.5"),
        "smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio": ("inst", "9.25"),
        "smsp__average_warps_issue_stalled_barrier_not_issued_per_issue_active.ratio": ("inst", "99"),
        "smsp__average_warps_issue_stalled_short_scoreboard_per_issue_active.ratio": ("inst", "0.5"),
        "smsp__average_warps_issue_stalled_sleeping_per_issue_active.ratio": ("inst", "1.0"),
    })
    s = bench.ncu_summary(text)
    assert s["duration_us"] == pytest.approx(120.0)
    assert s["dram_gbps"] == pytest.approx(252e6 / 120e-6 / 1e9)
    assert s["dram_pct"] == 45.5 and s["occupancy_pct"] == 22.25 and s["registers"] == 127 and s["grid"] == 264
    assert s["stalls"] == [("barrier", 9.25), ("long_scoreboard", 3.5), ("sleeping", 1.0)]


def test_ncu_summary_without_a_kernel_fails_loudly():
    with pytest.raises(ValueError, match="no profiled kernel"):
        bench.ncu_summary('"ID","Kernel Name"\n')


def test_ncu_without_nsight_compute_says_so(tmp_path, capsys):
    assert bench.run_ncu(str(tmp_path), ncu="no-such-ncu-binary") == 2
    assert "Nsight Compute" in capsys.readouterr().err
