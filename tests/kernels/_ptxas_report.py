"""One kernel source compiled by nvcc for sm_90a, and ptxas' ``-v`` report of its entry points.

The source is taken as NVRTC sees it (``_build.source``) and compiled with the project's NVRTC options
(``_build.NVRTC_OPTIONS``, ``-arch`` replaced by ``-gencode=arch=compute_90a,code=sm_90a``: see test_compile.py)
to a cubin. The report gives, per entry function, registers, static shared memory, stack frame and spills (stores
plus loads); the lines after "Compiling entry function" belong to that entry until the next one.

Test modules are imported with ``--import-mode=importlib``: they put this folder on ``sys.path`` and import
``_ptxas_report``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from mobalab.kernels._build import NVRTC_OPTIONS, source

_FUNC = re.compile(r"Function properties for (\S+)")
ENTRY = re.compile(r"Compiling entry function '(\S+)'")
# ptxas' notes that it executes a kernel's warpgroup MMAs one at a time (C7515: accumulator registers defined by
# other instructions while a group is in flight; C7518: a compiler-inserted wait on a divergent path, e.g. after an
# early return of part of a warpgroup), each a silent loss of the MMAs' overlap with the rest of the kernel
SERIALIZED = re.compile(r"\((C75\d\d)\) Potential Performance Loss: wgmma\.mma_async instructions are serialized"
                        r"[^\n]*?in the function '(\S+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def serialized_wgmma(log: str) -> list[tuple[str, str]]:
    """``[(message id, function)]`` of the ptxas notes that serialise a function's wgmma."""
    return SERIALIZED.findall(log)


def parse_ptxas(log: str) -> dict[str, dict[str, int]]:
    """``{function: {registers, smem, stack, spill_stores, spill_loads}}`` from a ptxas -v log."""
    funcs: dict[str, dict[str, int]] = {}
    current = None
    for line in log.splitlines():
        if m := ENTRY.search(line):
            current = m.group(1)
            funcs.setdefault(current, {})
        elif m := _FUNC.search(line):
            current = m.group(1)
            funcs.setdefault(current, {})
        elif (m := _FRAME.search(line)) and current is not None:
            funcs[current].update(stack=int(m.group(1)), spill_stores=int(m.group(2)),
                                  spill_loads=int(m.group(3)))
        elif (m := _USED.search(line)) and current is not None:
            funcs[current].update(registers=int(m.group(1)), smem=int(m.group(2) or 0))
    return funcs


def nvcc_flags() -> list[str]:
    keep = [o for o in NVRTC_OPTIONS if not o.startswith("-arch")]
    return [*keep, "-gencode=arch=compute_90a,code=sm_90a", "-cubin", "-Xptxas", "-v"]


def entry_report(filename: str, tmp: Path, defines: tuple[str, ...] = ()) -> dict[str, dict[str, int]]:
    """``{entry: {registers, smem, stack, spills}}`` of ``cuda/<filename>`` compiled in ``tmp`` with the extra
    preprocessor ``defines`` ("NAME=value", a build option; fails the test when nvcc does); prints the table (run
    pytest with ``-s`` to see it)."""
    src = tmp / filename
    src.write_text(source(filename))
    proc = subprocess.run([shutil.which("nvcc"), *nvcc_flags(), *(f"-D{d}" for d in defines), "-o",
                           str(src.with_suffix(".cubin")), str(src)],
                          capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"nvcc failed on {filename}:\n{log}"
    funcs = parse_ptxas(log)
    out = {}
    for name in ENTRY.findall(log):
        r = funcs[name]
        out[name] = {k: v for k, v in r.items() if not k.startswith("spill_")}
        if "spill_stores" in r:
            out[name]["spills"] = r["spill_stores"] + r["spill_loads"]
    print(f"\n{'kernel':<32} {'regs':>5} {'smem':>5} {'stack':>6} {'spill':>6}")
    for name, r in sorted(out.items()):
        print(f"{name:<32} {r.get('registers', 0):>5} {r.get('smem', 0):>5} {r.get('stack', 0):>6} "
              f"{r.get('spills', 0):>6}")
    return out
