import csv
import io
import math

import pytest

from mobalab.bench._ncu import TENSOR_METRIC, kernel_summaries


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
