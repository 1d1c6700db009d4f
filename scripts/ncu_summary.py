"""A short table from an Nsight Compute report: per kernel launch, time, rates and the top warp stall reasons.

    python3 scripts/ncu_summary.py report.ncu-rep

Reads the report's raw page in base units (``ncu --import ... --page raw --csv --print-units base``, so it runs
where ncu is) through :func:`mobalab.bench._ncu.kernel_summaries`; the profile should have collected
``mobalab.bench._ncu.NCU_METRICS`` (and for matrix kernels the tensor-pipe metric and ``TILE_METRICS``; columns
not collected read nan).
"""

from __future__ import annotations

import argparse
import subprocess

from mobalab.bench._ncu import kernel_summaries


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("report")
    a = p.parse_args(argv)
    raw = subprocess.run(["ncu", "--import", a.report, "--page", "raw", "--csv", "--print-units", "base"],
                         check=True, capture_output=True, text=True).stdout
    print("| kernel | µs | DRAM % of peak | DRAM GB/s | tensor pipe % | achieved occupancy % | registers | grid "
          "| shared-memory wavefronts (M) | L2 GB | instructions (M) | top stalls (cycles per issued instruction) |")
    print("|---" * 12 + "|")
    for s in kernel_summaries(raw):
        stalls = ", ".join(f"{name} {x:.2f}" for name, x in s["stalls"])
        cells = [f"{s[k]:.4g}" for k in ("duration_us", "dram_pct", "dram_gbps", "tensor_pct", "occupancy_pct",
                                          "registers", "grid", "smem_mwaves", "l2_gb", "minst")]
        print(f"| {s['kernel'][:48]} | " + " | ".join(cells) + f" | {stalls} |")


if __name__ == "__main__":
    main()
