"""Executed instructions of one kernel by opcode, from Nsight Compute's source page (SASS) as CSV.

    ncu --import REPORT.ncu-rep --page source --csv --print-source sass > K.csv
    python3 scripts/sass_summary.py K.csv [OTHER.csv ...] [--top 30]

Per file: warp instructions executed in all, then per opcode class (the SASS mnemonic up to its first dot, so
HMMA.16816.F32.BF16 is HMMA) the executed count, its share, and the stall samples of those instructions. With two
or more files the classes are tabled side by side, the first file's count divided by each other's in the last
column, so two kernels doing the same work can be compared instruction class by instruction class.
"""

from __future__ import annotations

import argparse
import csv
import io
import re
import sys
from collections import Counter
from pathlib import Path


def _rows(path: Path):
    text = path.read_text()
    lines = text.splitlines()
    # a first line names the kernel; the header is the first line that has "Address" and "Source"
    start = next(i for i, line in enumerate(lines) if line.startswith('"Address"'))
    name = lines[0].split(",")[1].strip('"') if lines[0].startswith('"Kernel Name"') else path.stem
    return name, list(csv.DictReader(io.StringIO("\n".join(lines[start:]))))


def _opcode(source: str) -> str:
    s = re.sub(r"^@!?U?P\w+\s+", "", source.strip())
    return s.split()[0].split(".")[0] if s else "?"


def summarize(path: Path) -> tuple[str, Counter, Counter]:
    """(kernel name, executed instructions per opcode class, stall samples per opcode class)."""
    name, rows = _rows(path)
    executed, samples = Counter(), Counter()
    for r in rows:
        op = _opcode(r["Source"])
        executed[op] += int(float(r.get("Instructions Executed") or 0))
        samples[op] += int(float(r.get("Warp Stall Sampling (All Samples)") or 0))
    return name, executed, samples


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("csv", nargs="+", type=Path)
    p.add_argument("--top", type=int, default=30)
    a = p.parse_args(argv)
    runs = [summarize(f) for f in a.csv]
    totals = [sum(e.values()) for _, e, _ in runs]
    head = ["opcode"]
    for (name, _, _), total in zip(runs, totals, strict=True):
        head += [f"{name[:40]} (M, {total / 1e6:.1f} M in all)", "share", "stall samples"]
    if len(runs) > 1:
        head += ["x " + " / x ".join(n[:20] for n, _, _ in runs[1:])]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    ops = sorted(set().union(*(e for _, e, _ in runs)), key=lambda o: -runs[0][1].get(o, 0))
    for op in ops[:a.top]:
        cells = [op]
        for (_, e, s), total in zip(runs, totals, strict=True):
            cells += [f"{e.get(op, 0) / 1e6:.2f}", f"{e.get(op, 0) / max(total, 1):.1%}", str(s.get(op, 0))]
        if len(runs) > 1:
            first = runs[0][1].get(op, 0)
            cells.append(" / ".join(f"{first / e.get(op):.2f}" if e.get(op) else "-" for _, e, _ in runs[1:]))
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
