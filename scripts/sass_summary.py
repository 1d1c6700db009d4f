"""Executed instructions of one kernel by opcode, from Nsight Compute's source page (SASS) as CSV.

    ncu --import REPORT.ncu-rep --page source --csv --print-source sass > K.csv
    python3 scripts/sass_summary.py K.csv [OTHER.csv ...] [--top 30] [--blocks 20]

Per file: warp instructions executed in all, then per opcode class (the SASS mnemonic up to its first dot, so
HMMA.16816.F32.BF16 is HMMA) the executed count, its share, and the stall samples of those instructions. With two
or more files the classes are tabled side by side, the first file's count divided by each other's in the last
column, so two kernels doing the same work can be compared instruction class by instruction class.

``--blocks N`` adds, for the first file, the N straight-line runs of the SASS (consecutive instructions executed
equally often: a basic block or the part of one between branch targets) that execute the most instructions, with
their share of the executed instructions and of the stall samples, the top stall reasons and the opcode mix: where
a kernel's instructions go, by code region (its first instruction names it in the listing).
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


def _number(x) -> float:
    try:
        return float(str(x).replace(",", ""))
    except ValueError:
        return 0.0


def summarize(path: Path) -> tuple[str, Counter, Counter]:
    """(kernel name, executed instructions per opcode class, stall samples per opcode class)."""
    name, rows = _rows(path)
    executed, samples = Counter(), Counter()
    for r in rows:
        op = _opcode(r["Source"])
        executed[op] += int(_number(r.get("Instructions Executed")))
        samples[op] += int(_number(r.get("Warp Stall Sampling (All Samples)")))
    return name, executed, samples


def blocks(path: Path, top: int) -> list[str]:
    """Markdown lines: the `top` straight-line runs of the kernel in `path` by instructions executed."""
    name, rows = _rows(path)
    stall_cols = [k for k in rows[0] if k.startswith("stall_") and "Not Issued" not in k] if rows else []
    total = sum(_number(r.get("Instructions Executed")) for r in rows) or 1.0
    total_s = sum(_number(r.get("Warp Stall Sampling (All Samples)")) for r in rows) or 1.0
    runs: list[list[int]] = []
    for i, r in enumerate(rows):
        e = _number(r.get("Instructions Executed"))
        if runs and _number(rows[runs[-1][0]].get("Instructions Executed")) == e:
            runs[-1].append(i)
        else:
            runs.append([i])
    runs.sort(key=lambda idx: -_number(rows[idx[0]].get("Instructions Executed")) * len(idx))
    out = [f"{name}: straight-line runs by instructions executed ({total / 1e6:.1f} M in all)", "",
           "| SASS rows | instructions | executions each | share | stall share | top stalls | opcodes | first |",
           "|---|---|---|---|---|---|---|---|"]
    for idx in runs[:top]:
        e = _number(rows[idx[0]].get("Instructions Executed"))
        samples = sum(_number(rows[i].get("Warp Stall Sampling (All Samples)")) for i in idx)
        reasons = Counter({k[6:]: sum(_number(rows[i].get(k)) for i in idx) for k in stall_cols})
        ops = Counter(_opcode(rows[i]["Source"]) for i in idx)
        stalls = ", ".join(f"{k} {v / max(samples, 1):.0%}" for k, v in reasons.most_common(3))
        opcodes = ", ".join(f"{k} {v}" for k, v in ops.most_common(6))
        out.append(f"| {idx[0]}-{idx[-1]} | {len(idx)} | {e / 1e6:.2f} M | {e * len(idx) / total:.1%} | "
                   f"{samples / total_s:.1%} | {stalls} | {opcodes} | `{rows[idx[0]]['Source'].strip()[:40]}` |")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("csv", nargs="+", type=Path)
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--blocks", type=int, default=0, help="also list the first file's N busiest straight-line runs")
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
    if a.blocks:
        print()
        print("\n".join(blocks(a.csv[0], a.blocks)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
