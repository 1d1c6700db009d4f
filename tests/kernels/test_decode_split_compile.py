"""cuda/decode_split.cu compiles under nvcc for sm_90a with every entry point, no spills, no stack frame.

The source is taken as NVRTC sees it (``_build.source``) and compiled with the project's NVRTC options
(``_build.NVRTC_OPTIONS``) for ``-gencode=arch=compute_90a,code=sm_90a``; ptxas' ``-v`` report gives
registers, shared memory, stack frame and spills per kernel (run with ``-s`` to see them). Registers must
stay within what each kernel's ``__launch_bounds__`` promises (routing: 2 CTAs of 256 threads per SM, at
most 128 registers; attention: 4 CTAs, at most 64).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from mobalab.kernels import _cuda_decode_split as S
from mobalab.kernels._build import NVRTC_OPTIONS, source
from mobalab.kernels._launch import signatures

ROUTE = [f"moba_decode_route_{t}_d{d}" for t in ("bf16", "fp16") for d in (64, 128)]
ATTEND = [f"moba_decode_attend_{t}_d{d}" for t in ("bf16", "fp16") for d in (64, 128)]
_ENTRY = re.compile(r"Compiling entry function '(\S+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict[str, dict[str, int]]:
    tmp = Path(tmp_path_factory.mktemp("decode_split_nvcc"))
    src = tmp / "decode_split.cu"
    src.write_text(source("decode_split.cu"))
    flags = [o for o in NVRTC_OPTIONS if not o.startswith("-arch")]
    proc = subprocess.run([shutil.which("nvcc"), *flags, "-gencode=arch=compute_90a,code=sm_90a", "-cubin",
                           "-Xptxas", "-v", "-o", str(tmp / "decode_split.cubin"), str(src)],
                          capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"nvcc failed on decode_split.cu:\n{log}"
    out: dict[str, dict[str, int]] = {}
    current = None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            current = m.group(1)
            out[current] = {}
        elif (m := _FRAME.search(line)) and current:
            out[current].update(stack=int(m.group(1)), spills=int(m.group(2)) + int(m.group(3)))
        elif (m := _USED.search(line)) and current:
            out[current].update(registers=int(m.group(1)), smem=int(m.group(2) or 0))
    print(f"\n{'kernel':<32} {'regs':>5} {'smem':>5} {'stack':>6} {'spill':>6}")
    for name, r in sorted(out.items()):
        print(f"{name:<32} {r.get('registers', 0):>5} {r.get('smem', 0):>5} {r.get('stack', 0):>6} "
              f"{r.get('spills', 0):>6}")
    return out


def test_entry_points_and_constants_match_the_wrapper():
    assert sorted(signatures("decode_split.cu")) == sorted(ROUTE + ATTEND)
    text = source("decode_split.cu")
    for name, value in (("DSP_THREADS", S.THREADS), ("DSP_FLAGS", S.FLAGS),
                        ("DSP_ROUTE_TILE_BYTES", S.ROUTE_TILE_BYTES), ("DSP_ROUTE_MAX_ROWS", S.ROUTE_MAX_ROWS),
                        ("DSP_ATTN_CHUNK", S.ATTN_CHUNK), ("DSP_ATTN_ROWS", S.ATTN_ROWS),
                        ("DSP_ROUTE_MIN_CTAS", S.ROUTE_MIN_CTAS), ("DSP_ATTN_MIN_CTAS", S.ATTN_MIN_CTAS)):
        assert re.search(rf"#define {name} {value}\b", text), name


@pytest.mark.nvcc
def test_decode_split_compiles_without_spills(report):
    assert sorted(report) == sorted(ROUTE + ATTEND)
    for name, r in report.items():
        assert r.get("stack", 0) == 0 and r.get("spills", 0) == 0, (name, r)
        min_ctas = S.ROUTE_MIN_CTAS if name in ROUTE else S.ATTN_MIN_CTAS
        assert r["registers"] <= 65536 // (S.THREADS * min_ctas), (name, r)
        assert r.get("smem", 0) == 0, (name, r)  # all shared memory is dynamic, sized by the plan
