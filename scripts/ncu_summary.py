"""A short table from an Nsight Compute report: per kernel, time, rates and the top warp stall reasons.

    python3 scripts/ncu_summary.py report.ncu-rep [--top 3]

Reads ``ncu --import <report> --page raw --csv`` (so it runs where ncu is) and prints one markdown row per
profiled kernel launch: duration, SM and DRAM throughput (% of peak), DRAM GB/s, tensor-pipe activity,
achieved occupancy, registers per thread, and the stall reasons with the most cycles per issued instruction.
"""

from __future__ import annotations

import argparse
import csv
import io
import re
import subprocess

COLUMNS = {  # header -> raw metric
    "us": "gpu__time_duration.sum",
    "SM %": "sm__throughput.avg.pct_of_peak_sustained_elapsed",
    "DRAM %": "gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed",
    "DRAM GB/s": "dram__bytes.sum.per_second",
    "tensor pipe %": "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active",
    "occupancy %": "sm__warps_active.avg.pct_of_peak_sustained_active",
    "regs": "launch__registers_per_thread",
    "grid": "launch__grid_size",
}
STALL = re.compile(r"smsp__average_warps_issue_stalled_(\w+?)_per_issue_active\.ratio$")


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def rows(report: str) -> tuple[list[str], list[dict]]:
    # base units (no auto-scaling), so every report reads the same; _scaled converts
    raw = subprocess.run(["ncu", "--import", report, "--page", "raw", "--csv", "--print-units", "base"], check=True,
                         capture_output=True, text=True).stdout
    table = list(csv.reader(io.StringIO(raw)))
    header, units, data = table[0], table[1], table[2:]
    unit_of = dict(zip(header, units, strict=False))
    return header, [dict(zip(header, r, strict=False)) | {"__units": unit_of} for r in data]


def _scaled(row: dict, metric: str) -> float | None:
    value = _number(row.get(metric, ""))
    if value is None:
        return None
    unit = row["__units"].get(metric, "")
    scale = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3, "second": 1e6,
             "s": 1e6, "byte/second": 1e-9, "B/s": 1e-9, "Kbyte/second": 1e-6, "KB/s": 1e-6, "Mbyte/second": 1e-3,
             "MB/s": 1e-3, "Gbyte/second": 1.0, "GB/s": 1.0, "Tbyte/second": 1e3, "TB/s": 1e3}.get(unit, 1.0)
    return value * scale


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("report")
    p.add_argument("--top", type=int, default=3)
    a = p.parse_args(argv)
    header, data = rows(a.report)
    stalls = [(m, STALL.match(m).group(1)) for m in header if STALL.match(m)]
    print("| kernel | " + " | ".join(COLUMNS) + " | top stalls (cycles per issue) |")
    print("|---" * (len(COLUMNS) + 2) + "|")
    for r in data:
        name = r.get("Kernel Name", "?")[:48]
        cells = []
        for metric in COLUMNS.values():
            v = _scaled(r, metric)
            cells.append("-" if v is None else f"{v:.4g}")
        ranked = sorted(((_number(r.get(m, "")) or 0.0, s) for m, s in stalls), reverse=True)[: a.top]
        top = ", ".join(f"{s} {v:.2f}" for v, s in ranked if v > 0)
        print(f"| {name} | " + " | ".join(cells) + f" | {top} |")


if __name__ == "__main__":
    main()
