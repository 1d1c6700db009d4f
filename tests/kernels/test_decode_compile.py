"""cuda/decode.cu compiles under nvcc for sm_90a with every entry point, no spills, no stack frame.

The source is taken as NVRTC sees it (``_build.source``) and compiled with the project's NVRTC options
(``_build.NVRTC_OPTIONS``: C++17, fast math) for ``-gencode=arch=compute_90a,code=sm_90a``. ptxas' ``-v``
report gives registers, shared memory, stack frame and spills per kernel; run with ``-s`` to see them.
Registers must stay within what the kernel's ``__launch_bounds__`` promises (2 CTAs of 256 threads per SM:
at most 128 registers).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from mobalab.kernels import _cuda_decode as C
from mobalab.kernels._build import source
from mobalab.kernels._launch import signatures

sys.path.insert(0, str(Path(__file__).parent))
from _background import background_fixture, scratch_dir  # noqa: E402
from _ptxas_report import entry_report  # noqa: E402

ENTRY_POINTS = [f"moba_decode_step_{t}_d{d}" for t in ("bf16", "fp16") for d in (64, 128)]


# made in the background once the tests are collected (_background)
report = background_fixture(
    "report", lambda: entry_report("decode.cu", scratch_dir("decode_nvcc")))
# the build for centroid_precision "input" (the routing scores the block means rounded to the cache's dtype)
report_input = background_fixture(
    "report_input", lambda: entry_report("decode.cu", scratch_dir("decode_nvcc_input"), (C.INPUT_CENTROIDS_DEFINE,)))


def test_entry_points_match_the_wrapper():
    assert sorted(signatures("decode.cu")) == sorted(ENTRY_POINTS)
    text = source("decode.cu")  # the #defines the plans mirror
    for name, value in (("DEC_THREADS", C.THREADS), ("DEC_FLAGS", C.FLAGS), ("DEC_ROUTE_STAGES", C.ROUTE_STAGES),
                        ("DEC_ROUTE_STAGE_BYTES", C.ROUTE_STAGE_BYTES), ("DEC_ROUTE_MAX_ROWS", C.ROUTE_MAX_ROWS),
                        ("DEC_ATTN_CHUNK", C.ATTN_CHUNK), ("DEC_ATTN_ROWS", C.ATTN_ROWS),
                        ("DEC_ATTN_STAGE_BYTES", C.ATTN_STAGE_BYTES), ("DEC_ATTN_MAX_STAGES", C.ATTN_MAX_STAGES)):
        assert re.search(rf"#define {name} {value}\b", text), name
    assert re.search(rf"__launch_bounds__\(DEC_THREADS, {C.CTAS_PER_SM}\)", text)


@pytest.mark.nvcc
@pytest.mark.parametrize("build", ["report", "report_input"])
def test_decode_compiles_without_spills(request, build):
    report = request.getfixturevalue(build)
    assert sorted(report) == sorted(ENTRY_POINTS)
    for name, r in report.items():
        assert r.get("stack", 0) == 0 and r.get("spills", 0) == 0, (name, r)
        assert r["registers"] <= 128, (name, r)
        assert r.get("smem", 0) == 0, (name, r)  # all shared memory is dynamic, sized by the plan
