"""cuda/decode_split.cu compiles under nvcc for sm_90a with every entry point, no spills, no stack frame.

The source is taken as NVRTC sees it (``_build.source``) and compiled with the project's NVRTC options
(``_build.NVRTC_OPTIONS``) for ``-gencode=arch=compute_90a,code=sm_90a``; ptxas' ``-v`` report gives
registers, shared memory, stack frame and spills per kernel (run with ``-s`` to see them). Registers must
stay within what each kernel's ``__launch_bounds__`` promises (scores: 2 CTAs of 256 threads per SM, at
most 128 registers; selection and attention: 4 CTAs, at most 64).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from mobalab.kernels import _cuda_decode as D
from mobalab.kernels import _cuda_decode_split as S
from mobalab.kernels._build import source
from mobalab.kernels._launch import signatures

sys.path.insert(0, str(Path(__file__).parent))
from _background import background_fixture, scratch_dir  # noqa: E402
from _ptxas_report import entry_report  # noqa: E402

SCORE = [f"moba_decode_route_score_{x}{t}_d{d}" for x in ("", "tops_") for t in ("bf16", "fp16") for d in (64, 128)]
SELECT = ["moba_decode_route_select"]
ATTEND = [f"moba_decode_attend_{p}{x}{t}_d{d}" for p in ("", "paged_") for x in ("", "select_")
          for t in ("bf16", "fp16") for d in (64, 128)]


# made in the background once the tests are collected (_background); the second: the attention kernel's cp.async
# build (DSP_ATTN_TMA=0)
report = background_fixture(
    "report", lambda: entry_report("decode_split.cu", scratch_dir("decode_split_nvcc")))
report_cp = background_fixture(
    "report_cp", lambda: entry_report("decode_split.cu", scratch_dir("decode_split_nvcc_cp"), ("DSP_ATTN_TMA=0",)))
# the score pass's build for centroid_precision "input" (the block means rounded to the cache's dtype)
report_input = background_fixture(
    "report_input", lambda: entry_report("decode_split.cu", scratch_dir("decode_split_nvcc_input"),
                                         (D.INPUT_CENTROIDS_DEFINE,)))


def test_entry_points_and_constants_match_the_wrapper():
    assert sorted(signatures("decode_split.cu")) == sorted(SCORE + SELECT + ATTEND)
    text = source("decode_split.cu")
    for name, value in (("DSP_THREADS", S.THREADS), ("DSP_FLAGS", S.FLAGS), ("DSP_SCORE_LOADS", S.SCORE_LOADS),
                        ("DSP_ROUTE_MAX_ROWS", S.ROUTE_MAX_ROWS), ("DSP_SELECT_LOADS", S.SELECT_LOADS),
                        ("DSP_ATTN_CHUNK", S.ATTN_CHUNK), ("DSP_ATTN_ROWS", S.ATTN_ROWS),
                        ("DSP_SCORE_MIN_CTAS", S.SCORE_MIN_CTAS), ("DSP_SELECT_MIN_CTAS", S.SELECT_MIN_CTAS),
                        ("DSP_ATTN_MIN_CTAS", S.ATTN_MIN_CTAS), ("DSP_ATTN_STAGES", S.ATTN_STAGES),
                        ("DSP_ATTN_THREADS", S.ATTN_THREADS),
                        ("DSP_ATTN_CACHE", S.ATTN_CACHE)):
        assert re.search(rf"#define {name} {value}\b", text), name


@pytest.mark.nvcc
@pytest.mark.parametrize("build", ["report", "report_cp", "report_input"])
def test_decode_split_compiles_without_spills(request, build):
    report = request.getfixturevalue(build)
    assert sorted(report) == sorted(SCORE + SELECT + ATTEND)
    for name, r in report.items():
        assert r.get("stack", 0) == 0 and r.get("spills", 0) == 0, (name, r)
        min_ctas = {**dict.fromkeys(SCORE, S.SCORE_MIN_CTAS), **dict.fromkeys(SELECT, S.SELECT_MIN_CTAS)}.get(
            name, S.ATTN_MIN_CTAS)
        threads = S.ATTN_THREADS if name in ATTEND else S.THREADS
        assert r["registers"] <= 65536 // (threads * min_ctas), (name, r)
        assert r.get("smem", 0) == 0, (name, r)  # all shared memory is dynamic, sized by the plan
