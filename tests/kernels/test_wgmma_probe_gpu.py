"""The Hopper warpgroup MMA helpers (cuda/wgmma.cuh) on hardware, through the probe kernels of
cuda/wgmma_probe.cu: ``a @ b.T`` by one warpgroup must equal torch's fp32 product of the same bf16/fp16
inputs.

A wrong descriptor field, swizzle or fragment mapping moves or mixes whole elements, so any of them shows
as an O(1) error; the tolerance only absorbs the fp32 summation order over K <= 128 products (each product
of two 16-bit floats is exact in fp32). The output is poisoned (NaN) and the accumulator starts as NaN with
scale-d = 0 on the first k-step, so an element the kernel does not write, or a first step that adds instead
of overwriting, fails. Inputs are random and never zero. A whole grid is one module compile and 24 one-CTA
launches (a few seconds, mostly the NVRTC compile), plus 12 of the transposed-B (MN-major) form.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu

sys.path.insert(0, str(Path(__file__).parent))
from _hopper import hopper_missing  # noqa: E402

if reason := hopper_missing():  # pragma: no cover - depends on the machine
    pytest.skip(reason, allow_module_level=True)

from mobalab.kernels._cuda_wgmma_probe import wgmma_probe  # noqa: E402

CASES = list(itertools.product((torch.bfloat16, torch.float16), (64, 128), (16, 64, 128), ("smem", "reg")))
# the transposed-B form (V in O = P V): b is K x N, D = a @ b; n 64 is the kernel's form, n 128 settles LBO
MN_CASES = list(itertools.product((torch.bfloat16, torch.float16), (64, 128), (16, 64, 128)))


def _nonzero(shape, dtype, gen):
    x = torch.randn(shape, generator=gen, device="cuda")
    x = torch.where(x.abs() < 0.05, torch.full_like(x, 0.5), x)  # no zeros (a zero hides a misplaced element)
    return x.to(dtype)


@pytest.mark.parametrize("dtype,n,k,a_source", CASES,
                         ids=[f"{str(d)[6:]}-n{n}-k{k}-{s}" for d, n, k, s in CASES])
def test_probe_matches_torch(dtype, n, k, a_source, poisoned_empty):
    gen = torch.Generator(device="cuda").manual_seed(1000 * n + k)
    a = _nonzero((64, k), dtype, gen)
    b = _nonzero((n, k), dtype, gen)
    with poisoned_empty():
        out = wgmma_probe(a, b, a_source)
    torch.cuda.synchronize()
    want = a.float() @ b.float().T
    assert not out.isnan().any(), f"{int(out.isnan().sum())} of {out.numel()} outputs unwritten or NaN"
    err = (out - want).abs()
    worst = divmod(int(err.argmax()), n)
    assert err.max() <= 1e-4 * (1 + want.abs().max()), (
        f"max error {float(err.max()):.3g} at (row, col) {worst}: got {float(out[worst])}, want {float(want[worst])}")


@pytest.mark.parametrize("dtype,n,k", MN_CASES, ids=[f"{str(d)[6:]}-n{n}-k{k}-regmn" for d, n, k in MN_CASES])
def test_probe_mn_major_b_matches_torch(dtype, n, k, poisoned_empty):
    gen = torch.Generator(device="cuda").manual_seed(1000 * n + k + 7)
    a = _nonzero((64, k), dtype, gen)
    b = _nonzero((k, n), dtype, gen)
    with poisoned_empty():
        out = wgmma_probe(a, b, "reg", "mn")
    torch.cuda.synchronize()
    want = a.float() @ b.float()
    assert not out.isnan().any(), f"{int(out.isnan().sum())} of {out.numel()} outputs unwritten or NaN"
    err = (out - want).abs()
    worst = divmod(int(err.argmax()), n)
    assert err.max() <= 1e-4 * (1 + want.abs().max()), (
        f"max error {float(err.max()):.3g} at (row, col) {worst}: got {float(out[worst])}, want {float(want[worst])}")
