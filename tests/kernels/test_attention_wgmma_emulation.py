"""The wgmma forward tile kernel (cuda/attention_wgmma.cu, variant "wgmma") run on the host: the forward's output and
lse against the fp32 reference, no GPU.

``host_emulation/attention_wgmma_harness.cpp`` runs the kernel texts as NVRTC sees them (head dim 128), with every
CUDA thread a coroutine (cuda_host.h: switches at barriers in shuffled orders, cp.async landing only when its thread
waits, poisoned shared memory, AddressSanitizer) and the warpgroup MMAs modelled by ``wgmma_host_model.h``: S = Q K^T
with both operands K-major from 128-byte-swizzled shared memory, P V with P packed into A registers and V read as the
MN-major B operand, each MMA reading shared memory through its descriptor only when its warpgroup waits for it, so a
wrong descriptor, layout, fragment packing or accumulator mapping, or a buffer refilled while its MMA is pending,
gives wrong outputs. The forward wrapper runs as a user calls it (the chunk plan, the torch sort of the key-block
lists, every launch exactly as planned: grid, threads, shared-memory size, arguments checked against the signature),
with each launch, the merge and the list kernels of attention.cu included, executed by the harness on CPU tensors,
the routing given; torch.empty returns NaN-filled tensors, so an element no kernel writes shows. Criterion: the GPU
tests' (conftest.GpuOracle.check_forward). Not emulated: the warp-specialised "wgmma-ws" kernels (mbarriers and
setmaxnreg are not modelled), the fp32 partial format's module, and what only hardware shows (PTX, the async-proxy
fences, speed: tests/kernels/test_attention_wgmma_gpu.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from mobalab.kernels import _cuda_attention as A
from mobalab.kernels import reference
from mobalab.kernels._build import source

sys.path.insert(0, str(Path(__file__).parent))
from _attention_emulation import harness_files, head_dim_flags, kernel_table, launcher, wgmma_text  # noqa: E402
from _emulation import NEEDS_CXX, harness_fixture  # noqa: E402

from conftest import GpuOracle  # noqa: E402

pytestmark = NEEDS_CXX

DIM = 128  # the wgmma kernel's only head dim; the harness builds no other


def _kernel_files() -> dict[str, str]:
    # attention.cu's kernels of head dim 128 or none, and the wgmma tile kernels (moba_attn_wg_*, not wgmma-ws)
    table = kernel_table((A.SOURCE, A.WGMMA_SOURCE), lambda d: d == DIM,
                         lambda f, name: f != A.WGMMA_SOURCE or name.startswith("moba_attn_wg_"),
                         idle_checked=(A.WGMMA_SOURCE,))
    return harness_files({"attention_kernels.cu": source(A.SOURCE),
                          "attention_wgmma_kernels.cu": wgmma_text(A.WGMMA_SOURCE),
                          "attention_wgmma_kernel_table.inc": table})


harness = harness_fixture("attention_wgmma_harness", _kernel_files, flags=head_dim_flags((DIM,)))


@pytest.fixture
def emulated_forward(harness, tmp_path, monkeypatch, poisoned_empty):
    """``run(q, k, v, topk, block, top_k, causal, scale=None)`` -> (out, lse, kernels run): the forward wrapper,
    variant "wgmma", 16-bit partials, the routing given, every launch run by the harness."""
    monkeypatch.setenv("MOBALAB_PAIR_SORT", "torch")
    monkeypatch.setenv("MOBALAB_ATTN_PARTIAL", "16bit")
    emulate = launcher(harness, tmp_path, (A.SOURCE, A.WGMMA_SOURCE))

    def run(q, k, v, topk, block, top_k, causal, scale=None):
        with monkeypatch.context() as m:
            m.setattr(A, "launch", emulate)
            with poisoned_empty():
                scale = q.shape[-1] ** -0.5 if scale is None else scale
                out, lse = A._forward(q, k, v, block, top_k, causal, scale, True, topk, "wgmma", None,
                                      A.resolve_partial(None), None, False)
        return out, lse, list(emulate.launched)

    return run


CASES = [
    # dtype, block, causal, seqlen, top_k, heads, kv_heads, softmax scale (None: 1 / sqrt(d))
    (torch.bfloat16, 64, True, 200, 3, 2, 1, None),     # N % B != 0, GQA 2, the causal mask in the own block
    (torch.float16, 128, False, 300, 2, 2, 2, None),    # non-causal, the last block's keys past N zero-filled, masked
    (torch.float16, 64, False, 150, 2, 4, 1, -0.05),    # GQA 4: rows of four query heads in a tile; negative scale
    (torch.bfloat16, 128, True, 90, 2, 2, 1, None),     # N < B, k >= n blocks
    (torch.bfloat16, 128, True, 700, 2, 4, 1, 0.2),     # segments of more than one 16-tile unit, the gather refilled
    (torch.bfloat16, 32, True, 300, 4, 2, 1, None),     # B 32: S as m64n32k16, P V over two k-steps of V
    (torch.float16, 32, False, 100, 3, 2, 2, None),     # B 32 non-causal, the last block partial
]


def _id(c) -> str:
    dtype, block, causal, n, k, h, hk, scale = c
    return (f"{str(dtype)[6:]}-B{block}-{'causal' if causal else 'full'}-N{n}-k{k}-h{h}/{hk}"
            + ("" if scale is None else f"-scale{scale}"))


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_emulated_wgmma_forward_matches_oracle(emulated_forward, case):
    dtype, block, causal, seqlen, top_k, heads, kv_heads, scale = case
    g = torch.Generator().manual_seed(seqlen + block)
    q, k, v = (torch.randn(1, seqlen, h, DIM, generator=g).to(dtype) for h in (heads, kv_heads, kv_heads))
    topk = reference.moba_topk(q, k, block, top_k, causal=causal)
    out, lse, launched = emulated_forward(q, k, v, topk, block, top_k, causal, scale)
    tile, merge = A.kernel_names(dtype, DIM, block, "wgmma")
    assert tile.startswith("moba_attn_wg_") and tile in launched and merge in launched
    GpuOracle.check_forward(q, k, v, topk, block, causal, out, lse, scale, label=_id(case))
