"""Nsight Compute reports read back: one summary per profiled kernel launch from the raw page.

The benchmarks profile with ``ncu ... --metrics`` :data:`NCU_METRICS` and read the report with
``ncu --import REPORT --page raw --csv --print-units base`` (one header row, one units row, then one row per
launch). Everything here is plain text processing, so it is tested on machines without a GPU.
"""

from __future__ import annotations

import csv
import io
import math
import re

__all__ = ["NCU_METRICS", "TENSOR_METRIC", "TILE_METRICS", "kernel_summaries"]

#: metrics every summary needs (DRAM bytes and time give GB/s without relying on a section's layout)
NCU_METRICS = ("gpu__time_duration.sum", "dram__bytes_read.sum", "dram__bytes_write.sum",
               "dram__throughput.avg.pct_of_peak_sustained_elapsed",
               "sm__warps_active.avg.pct_of_peak_sustained_active", "launch__registers_per_thread",
               "launch__grid_size", "launch__occupancy_limit_registers")
#: the tensor pipe's busy share, for kernels built on the matrix units
TENSOR_METRIC = "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active"
#: what a matrix kernel feeds its MMAs with: shared-memory wavefronts (ldmatrix and plain loads / stores, bank
#: conflicts included), bytes through L2 (gathers and atomics that stay on chip) and instructions issued
TILE_METRICS = ("l1tex__data_pipe_lsu_wavefronts_mem_shared.sum", "lts__t_bytes.sum", "smsp__inst_executed.sum")
_STALL = re.compile(r"^smsp__average_warps?_(?:latency_)?issue_stalled_(\w+?)(?:_per_issue_active)?\.ratio$")
_SCALE = {"ns": 1e-3, "nsecond": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3,
          "byte": 1.0, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9}


def _number(text: str) -> float:
    try:
        return float(str(text).replace(",", ""))
    except ValueError:
        return math.nan


def kernel_summaries(raw_csv: str) -> list[dict]:
    """Per launch: kernel name, duration (µs), DRAM throughput (% of peak, GB/s and MB moved), achieved
    occupancy, registers, grid, tensor-pipe activity (NaN when not collected) and the three largest warp stall
    reasons (cycles per issued instruction), from the raw page's CSV text; with :data:`TILE_METRICS` collected also
    shared-memory wavefronts (millions), L2 traffic (GB) and instructions issued (millions), else NaN. ValueError
    when it holds no launch."""
    rows = [r for r in csv.reader(io.StringIO(raw_csv)) if r]
    if len(rows) < 3:
        raise ValueError(f"no profiled kernel in the Nsight Compute report ({len(rows)} CSV rows)")
    head, units = rows[0], rows[1]
    out = []
    for vals in rows[2:]:
        m = {h: (_number(v), u) for h, u, v in zip(head, units, vals, strict=False)}
        names = dict(zip(head, vals, strict=False))

        def val(name, m=m):
            x, unit = m.get(name, (math.nan, ""))
            return x * _SCALE.get(unit, 1.0)

        us = val("gpu__time_duration.sum")
        dram = val("dram__bytes_read.sum") + val("dram__bytes_write.sum")
        stalls = sorted(((name, x) for h, (x, _) in m.items() if (name := (_STALL.match(h) or [None, None])[1])
                         and not name.endswith("not_issued") and not math.isnan(x)), key=lambda t: -t[1])
        out.append(dict(kernel=names.get("Kernel Name", "?"), duration_us=us,
                        dram_pct=val("dram__throughput.avg.pct_of_peak_sustained_elapsed"),
                        dram_gbps=dram / (us * 1e-6) / 1e9 if us > 0 else math.nan, dram_mb=dram / 1e6,
                        occupancy_pct=val("sm__warps_active.avg.pct_of_peak_sustained_active"),
                        registers=val("launch__registers_per_thread"), grid=val("launch__grid_size"),
                        tensor_pct=val(TENSOR_METRIC), stalls=stalls[:3],
                        smem_mwaves=val(TILE_METRICS[0]) / 1e6, l2_gb=val(TILE_METRICS[1]) / 1e9,
                        minst=val(TILE_METRICS[2]) / 1e6))
    return out
