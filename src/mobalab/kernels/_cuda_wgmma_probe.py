r"""Hardware probe of the Hopper warpgroup MMA helpers (cuda/wgmma.cuh) through cuda/wgmma_probe.cu.

One CTA of one warpgroup (128 threads) computes

.. math::
    D = A B^{\top},\qquad A \in \mathbb{R}^{64\times K},\ B \in \mathbb{R}^{N\times K},\ D \in \mathbb{R}^{64\times N}
    \ (\text{fp32}),

with ``wgmma.mma_async`` over :math:`K/16` k-steps, A and B staged in shared memory in the 128-byte
swizzled K-major layout (``a_source="smem"``) or A packed in registers from the accumulator layout
(``a_source="reg"``, the path of P in P·V). With ``b_major="mn"`` (A from registers) B is given as
:math:`K\times N` and the product is :math:`D = A B`: B is staged MN-major and read with wgmma's transposed-B
form, the path of V in P·V. It exists to prove the descriptor encoding, the swizzle and the
fragment mappings on hardware before a tile kernel relies on them; the MoBA kernels do not use it yet (see
docs/design.md, "Hopper path"). What the kernel receives is decided by :func:`probe_launch`, plain
Python that CI checks against the CUDA signature.
"""

from __future__ import annotations

import numpy as np
import torch

from . import _contract as C
from ._launch import Launch, kernel_ready, launch

__all__ = ["probe_launch", "wgmma_probe"]

SOURCE = "wgmma_probe.cu"
THREADS = 128  # one warpgroup
ROWS = 64  # M of wgmma .m64nNk16
K_STEP = 16
MAX_K_STEPS = 8  # WGMMA_PROBE_MAX_KSTEPS in wgmma_probe.cu
WIDTHS = (64, 128)  # N
A_SOURCES = ("smem", "reg")
B_MAJORS = ("k", "mn")  # B as N x K (K-major, D = A B^T) or K x N (MN-major, D = A B; A from registers)
_PATTERN_BYTES = 1024  # 128-byte swizzle repeat: the tiles' alignment
_ROW_BYTES = 128  # one swizzled row: 64 two-byte elements of K


def shared_bytes(n: int, k: int, b_major: str = "k") -> int:
    """Dynamic shared memory of the probe (``wgmma_probe`` in wgmma_probe.cu): the A and B tiles, each
    row padded to whole 64-element blocks of K (of N for an MN-major B: K rows of 128 bytes per 64 elements of
    N), plus 1024 bytes to align them."""
    blocks = -(-k // 64)
    b_bytes = -(-n // 64) * k * _ROW_BYTES if b_major == "mn" else blocks * n * _ROW_BYTES
    return _PATTERN_BYTES + blocks * ROWS * _ROW_BYTES + b_bytes


def probe_launch(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, a_source: str = "smem",
                 b_major: str = "k") -> Launch:
    """The launch of ``out = a @ b.T`` (``a`` 64 x K, ``b`` N x K, both bf16 or fp16, ``out`` 64 x N fp32), or
    with ``b_major="mn"`` of ``out = a @ b`` (``b`` K x N; ``a_source`` must be "reg")."""
    if a_source not in A_SOURCES:
        raise ValueError(f"a_source must be one of {A_SOURCES}, got {a_source!r}")
    if b_major not in B_MAJORS:
        raise ValueError(f"b_major must be one of {B_MAJORS}, got {b_major!r}")
    if b_major == "mn" and a_source != "reg":
        raise ValueError(f"b_major='mn' is probed with a_source='reg' (the P V path), got a_source={a_source!r}")
    if b_major == "mn" and b.dim() == 2:
        b = b.T  # check the K x N operand as the N x K one below
    if a.dtype not in (torch.bfloat16, torch.float16) or b.dtype != a.dtype:
        raise TypeError(f"a and b must both be bfloat16 or float16, got {a.dtype} and {b.dtype}")
    if a.dim() != 2 or a.shape[0] != ROWS:
        raise ValueError(f"a must be {ROWS} x K, got shape {tuple(a.shape)}")
    k = a.shape[1]
    if k % K_STEP or not K_STEP <= k <= K_STEP * MAX_K_STEPS:
        raise ValueError(f"K must be a multiple of {K_STEP} in [{K_STEP}, {K_STEP * MAX_K_STEPS}], got {k}")
    if b.dim() != 2 or b.shape[0] not in WIDTHS or b.shape[1] != k:
        raise ValueError(f"b must be N x {k} with N in {WIDTHS}, got shape {tuple(b.shape)}")
    n = b.shape[0]
    if out.shape != (ROWS, n) or out.dtype != torch.float32:
        raise ValueError(f"out must be float32 of shape {(ROWS, n)}, got {out.dtype} {tuple(out.shape)}")
    tag = C.dtype_tag(a.dtype, SOURCE)
    operands = a_source if b_major == "k" else a_source + "mn"
    b = b if b_major == "k" else b.T  # the tensor as given (K x N, contiguous)
    return Launch(SOURCE, f"moba_wgmma_probe_{tag}_n{n}_{operands}", (1,), (THREADS,),
                  (a, b, out, np.int32(k // K_STEP)), shared_mem=shared_bytes(n, k, b_major))


def wgmma_probe(a: torch.Tensor, b: torch.Tensor, a_source: str = "smem", b_major: str = "k") -> torch.Tensor:
    """``a @ b.T`` (or ``a @ b`` with ``b_major="mn"``) in fp32 computed by one warpgroup with
    ``wgmma.mma_async`` (see the module docstring)."""
    a, b = kernel_ready(a), kernel_ready(b)
    n = b.shape[1] if b_major == "mn" else b.shape[0]
    out = torch.empty(ROWS, n, dtype=torch.float32, device=a.device)
    launch(probe_launch(a, b, out, a_source, b_major))
    return out
