"""What the attention host-emulation tests share (test_attention_emulation.py, test_attention_wgmma_emulation.py,
test_attention_bwd_wgmma_emulation.py): the harness' kernel table, ptx.cuh's swizzle for attention_model.h, and a
wgmma module's text with the host model of the warpgroup MMAs put in after wgmma.cuh's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from _emulation import run_emulated

from conftest import GpuOracle
from mobalab.kernels._build import source
from mobalab.kernels._launch import signatures

_SCALARS = {"int": "I(a[{i}])", "long long": "a[{i}].i", "float": "a[{i}].f", "unsigned": "(unsigned)a[{i}].i"}
WGMMA_MARKER = "// ---- end wgmma.cuh ----"
# Declarations that CUDA accepts and the host compiler, with cuda_host.h's `__shared__` (`static`: function-local
# statics, one CTA runs at a time), does not: `extern static`, and an alignment specifier after `static`. Each is
# rewritten into the same declaration in a form both accept.
REWRITES = {"extern __shared__ unsigned char smem[];": "MOBA_DYNAMIC_SMEM(smem);",
            "__shared__ alignas(8) ": "alignas(8) __shared__ "}


def kernel_table(files: Iterable[str], keep_dim: Callable[[int], bool],
                 keep: Callable[[str, str], bool] = lambda f, name: True, idle_checked: Iterable[str] = ()) -> str:
    """One kernel-table line per kernel of ``files`` (cuda/ sources) whose head dim passes ``keep_dim`` (head-dim-free
    kernels always) and ``keep(file, name)``; the threads of the kernels of ``idle_checked`` files are checked for
    wgmma groups they never waited for."""
    idle_checked = set(idle_checked)
    lines = []
    for f in files:
        for name, params in signatures(f).items():
            dim = name.rsplit("_d", 1)[-1].split("_")[0] if "_d" in name else ""
            if (dim.isdigit() and not keep_dim(int(dim))) or not keep(f, name):
                continue
            args = ", ".join(f"P<{p.ctype}>(a[{i}])" if p.pointer else _SCALARS[p.ctype].format(i=i)
                             for i, p in enumerate(params))
            body = f"{name}({args});" + (" moba::wgmma_check_idle();" if f in idle_checked else "")
            lines.append(f'{{"{name}", {{{len(params)}, [](const std::vector<Arg>& a) {{ {body} }}}}}},')
    return "\n".join(lines) + "\n"


def harness_files(texts: dict[str, str]) -> dict[str, str]:
    """A harness' kernel texts and kernel table (``texts``: file name -> text) with the headers every attention
    harness includes: ptx.cuh's swizzle and empty cuda_bf16.h / cuda_fp16.h (attention_model.h defines the types)."""
    return {**texts, "ptx_swizzle.h": swizzle_header(), "cuda_bf16.h": "#pragma once\n",
            "cuda_fp16.h": "#pragma once\n"}


def head_dim_flags(dims: Iterable[int]) -> tuple[str, ...]:
    """Compiler flags of an attention harness that builds the kernels of head dims ``dims`` (EMU_HEAD_DIM_OK)."""
    return ("-Wno-unknown-pragmas", "-DEMU_HEAD_DIM_OK(d)=(" + "||".join(f"(d)=={d}" for d in dims) + ")")


def launcher(harness, tmp_path, sources: Iterable[str]):
    """A stand-in for a wrapper module's ``launch``: runs a plan of one of ``sources`` (default build only) in
    ``harness``, launch l with seed l (a second call runs other CTA and thread orders); ``.launched`` lists the
    kernels run, in order."""
    sources = tuple(sources)
    launched = []

    def launch(plan):
        assert plan.source in sources and plan.defines == (), (plan.source, plan.defines)
        run_emulated(harness, tmp_path, [plan], seed=len(launched))
        launched.append(plan.kernel)

    launch.launched = launched
    return launch


def swizzle_header() -> str:
    """ptx.cuh's own swizzle (swz_chunk, swz) for attention_model.h, in namespace moba."""
    text = source("ptx.cuh")
    start = text.index("template <int D>\n__device__ __forceinline__ int swz_chunk")
    end = text.index("#define MOBA_SWZ_COL")
    return "#pragma once\nnamespace moba {\n" + text[start:end] + "}  // namespace moba\n"


def wgmma_text(filename: str) -> str:
    """cuda/``filename`` as NVRTC sees it, with wgmma_host_model.h after wgmma.cuh's text and the declarations of
    REWRITES rewritten (the dynamic shared memory through MOBA_DYNAMIC_SMEM: the emulation's, the launch's buffer)."""
    text = source(filename)
    assert text.count(WGMMA_MARKER) == 1
    text = text.replace(WGMMA_MARKER, WGMMA_MARKER + '\n#include "wgmma_host_model.h"')
    for old, new in REWRITES.items():
        text = text.replace(old, new)
    own = text.split("// ---- end ptx.cuh ----")[-1]  # ptx.cuh's text is skipped by the harness
    assert "extern __shared__" not in own and "__shared__ alignas" not in own
    return text


def check_grads(grads, q, k, v, dout, topk, block, causal, label):
    """The GPU tests' criterion for emulated gradients: dtype and shape of the inputs, finite, and each within 3x the
    error of the same computation in torch's low precision (conftest.GpuOracle) against the fp32 reference, plus a
    floor."""
    ref = GpuOracle.oracle_grads(q, k, v, dout, topk, block, causal)
    low = GpuOracle.lowp_grads(q, k, v, dout, topk, block, causal)
    for name, g, r, lo, x in zip("qkv", grads, ref, low, (q, k, v), strict=True):
        assert g.dtype == x.dtype and g.shape == x.shape, f"{label}: d{name} {g.dtype} {tuple(g.shape)}"
        assert torch.isfinite(g).all(), f"{label}: non-finite d{name} (unwritten or NaN)"
        GpuOracle.assert_within_torch_error(g, r, lo, factor=3, floor=1e-4 * (1.0 + r.abs().max().item()),
                                            label=f"{label}: d{name}")
