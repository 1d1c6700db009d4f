import csv
import io
import math

import pytest

from mobalab.bench._ncu import TENSOR_METRIC, TILE_METRICS, kernel_summaries


def test_one_summary_per_launch_in_report_order():
    out = io.StringIO()
    w = csv.writer(out, quoting=csv.QUOTE_ALL)
    w.writerow(["ID", "Kernel Name", "gpu__time_duration.sum", "dram__bytes_read.sum", "dram__bytes_write.sum",
                TENSOR_METRIC, "smsp__average_warps_issue_stalled_wait_per_issue_active.ratio"])
    w.writerow(["", "", "ns", "byte", "byte", "%", "inst"])
    w.writerow(["0", "moba_attn_res_bf16_d128_kt64", "600,000", "1000000000", "0", "26.95", "1.26"])
    w.writerow(["1", "moba_attn_merge_bf16_d128", "120,000", "400000000", "100000000", "", "0.5"])
    tile, merge = kernel_summaries(out.getvalue())
    assert tile["kernel"] == "moba_attn_res_bf16_d128_kt64" and merge["kernel"] == "moba_attn_merge_bf16_d128"
    assert tile["duration_us"] == pytest.approx(600.0) and tile["tensor_pct"] == 26.95
    assert merge["dram_gbps"] == pytest.approx(500e6 / 120e-6 / 1e9) and math.isnan(merge["tensor_pct"])
    assert tile["stalls"] == [("wait", 1.26)] and math.isnan(tile["dram_pct"])


def test_tile_metrics_when_collected_else_nan():
    out = io.StringIO()
    w = csv.writer(out, quoting=csv.QUOTE_ALL)
    w.writerow(["ID", "Kernel Name", "gpu__time_duration.sum", *TILE_METRICS])
    w.writerow(["", "", "ms", "", "Gbyte", "inst"])
    w.writerow(["0", "moba_bwd_bf16_d128", "8.5", "3,250,000,000", "61.5", "9,000,000,000"])
    out2 = io.StringIO()
    w2 = csv.writer(out2, quoting=csv.QUOTE_ALL)
    w2.writerow(["ID", "Kernel Name", "gpu__time_duration.sum"])
    w2.writerow(["", "", "us"])
    w2.writerow(["0", "moba_attn_merge_bf16_d128", "120"])
    (tile,), (merge,) = kernel_summaries(out.getvalue()), kernel_summaries(out2.getvalue())
    assert tile["duration_us"] == pytest.approx(8500.0)
    assert tile["smem_mwaves"] == pytest.approx(3250.0) and tile["l2_gb"] == pytest.approx(61.5)
    assert tile["minst"] == pytest.approx(9000.0)
    assert math.isnan(merge["smem_mwaves"]) and math.isnan(merge["l2_gb"]) and math.isnan(merge["minst"])
