"""CPU checks of the differentiable MoBA op: the launch ABI of every backward kernel, plans, validation, the
custom op's autograd wiring (CPU implementation = the reference), gradcheck of the op, torch.compile.

gradcheck of the reference itself, and its backward equations, live in tests/kernels/test_reference.py.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch

import mobalab.kernels as K
from mobalab.kernels import _contract as C
from mobalab.kernels import _cuda_attention as A
from mobalab.kernels import _cuda_backward as G
from mobalab.kernels import _pairs as P
from mobalab.kernels import autograd as AG
from mobalab.kernels import reference as R
from mobalab.kernels._build import source
from mobalab.kernels._launch import check_args, signatures
from mobalab.kernels.autograd import moba_attention_autograd


def _qkv(batch=1, seqlen=21, heads=4, kv_heads=2, dim=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda h: torch.randn(batch, seqlen, h, dim, generator=g).to(dtype)  # noqa: E731
    return mk(heads), mk(kv_heads), mk(kv_heads)


# ---------------------------------------------------------------------------------------------------
# launch ABI


def test_every_backward_kernel_is_in_the_source():
    sigs = signatures(G.SOURCE)
    for dtype in C.CUDA_DTYPES:
        for dim in C.CUDA_HEAD_DIMS:
            assert set(G.bwd_kernel_names(dtype, dim)) <= set(sigs)
        for dim in G.BLOCK_HEAD_DIMS:
            assert set(G.bwd_kernel_names(dtype, dim, "block")) <= set(sigs)
    assert "moba_bwd_rows" in sigs
    assert len(sigs) == (3 * len(C.CUDA_HEAD_DIMS) + len(G.BLOCK_HEAD_DIMS)) * len(C.CUDA_DTYPES) + 1
    # the variant's geometry is the kernel's
    text = source(G.SOURCE)
    assert f"#define MOBA_BWD_BLOCK_KEYS {G.BLOCK_KEYS}" in text
    assert f"#define MOBA_BWD_BLOCK_THREADS {G.BLOCK_THREADS}" in text
    assert f"constexpr int kDeltaStagedRows = {G.DELTA_STAGED_ROWS};" in source("attention_bwd.cuh")


@pytest.mark.parametrize("n_bt,heads,want", [(1 << 19, 32, 32), (1 << 19, 128, 16), (16384, 16, 16),
                                             (1000, 16, 1), (4096, 3000, 1)])
def test_delta_tokens(n_bt, heads, want):
    """Positions per delta CTA: up to 32, every head's rows within the staged stats, at least 1024 CTAs."""
    assert G.delta_tokens(n_bt, heads) == want


def _plans(dtype, dim, block, deterministic, batch=2, seqlen=100, heads=4, kv_heads=2, top_k=3, variant="tile"):
    q, k, v = _qkv(batch, seqlen, heads, kv_heads, dim, dtype)
    n_blocks = math.ceil(seqlen / block)
    chunk = G.bwd_plan(batch, seqlen, heads, kv_heads, dim, top_k, deterministic, 1 << 20)[0]
    n_pairs = chunk.n_heads * chunk.n_q * top_k
    n_seg = chunk.n_heads // (heads // kv_heads) * n_blocks
    f32 = torch.zeros(8)
    i64 = torch.zeros(8, dtype=torch.int64)
    i32 = torch.zeros(8, dtype=torch.int32)
    delta_name, main_name, merge_name = G.bwd_kernel_names(dtype, dim, variant)
    plans = [G.delta_launch(delta_name, q, q, f32, batch * seqlen * heads, seqlen=seqlen, heads=heads),
             G.rows_launch(i64, i64, f32, f32, n_pairs, n_seg, seqlen=seqlen, heads=heads, top_k=top_k,
                           chunk=chunk)]
    common = dict(seqlen=seqlen, heads=heads, kv_heads=kv_heads, block_size=block, n_blocks=n_blocks, chunk=chunk,
                  n_seg=n_seg, causal=True, scale=0.125, dkv_mode=G.dkv_mode(chunk, seqlen),
                  smem=G.bwd_smem_bytes(dim, variant), variant=variant, top_k=top_k)
    if deterministic:
        for sub in range(G.n_key_subtiles(block, variant)):
            plans.append(G.bwd_launch(main_name, q, k, v, q, f32, i64, i64, f32, f32, k, v, f32, f32, sub0=sub,
                                      n_sub_launch=1, dq_mode=1 if sub == 0 else 2, **common))
        plans.append(G.dq_merge_launch(merge_name, f32, i32, q, seqlen=seqlen, heads=heads, top_k=top_k,
                                       n_blocks=n_blocks, chunk=chunk))
    else:
        plans.append(G.bwd_launch(main_name, q, k, v, q, f32, i64, i64, f32, f32, k, v, f32, f32, sub0=0,
                                  n_sub_launch=G.n_key_subtiles(block, variant), dq_mode=0, **common))
    # the forward's index kernels, reused by the backward, with the backward's chunk
    plans += [A.keys_launch(i32, i32, seqlen, heads, top_k, n_blocks, chunk, 2),
              A.bounds_launch(i32, n_pairs, n_seg, i64),
              # the delta launch zeroing a 16-bit dQ and writing the row stats
              G.delta_launch(delta_name, q, q, f32, batch * seqlen * heads, torch.empty_like(q), lse=f32, stats=f32,
                             seqlen=seqlen, heads=heads)]
    return plans, n_seg


@pytest.mark.parametrize("dtype", C.CUDA_DTYPES)
@pytest.mark.parametrize("dim", C.CUDA_HEAD_DIMS)
@pytest.mark.parametrize("block", C.CUDA_BLOCK_SIZES)
@pytest.mark.parametrize("deterministic", [False, True])
def test_backward_launch_args_match_signatures(dtype, dim, block, deterministic):
    variants = ["tile"] + (["block"] if G.block_supported(dim, block) else []) + \
        (["wgmma"] if G.wgmma_supported(dim, block) else [])
    for variant in variants:
        plans, n_seg = _plans(dtype, dim, block, deterministic, variant=variant)
        for plan in plans:
            assert len(check_args(plan.source, plan.kernel, plan.args)) == len(signatures(plan.source)[plan.kernel])
        mains = [p for p in plans if p.kernel == G.bwd_kernel_names(dtype, dim, variant)[1]]
        # one launch covering every sub-tile, or one launch per sub-tile in order
        assert sum(p.grid[0] for p in mains) == n_seg * G.n_key_subtiles(block, variant)
        assert all(p.shared_mem == G.bwd_smem_bytes(dim, variant) and p.block == (G.bwd_threads(dim, variant),)
                   for p in mains)
        if variant == "wgmma":  # it decodes the pairs itself: top_k and the chunk's queries close its arguments
            chunk = G.bwd_plan(2, 100, 4, 2, dim, 3, deterministic, 1 << 20)[0]
            assert all(tuple(int(a) for a in p.args[-3:]) == (3, chunk.n_q, chunk.t0) for p in mains)


def test_wgmma_main_launch_needs_top_k():
    """The wgmma main kernel builds its row records from the pairs, so its launch without top_k is refused."""
    q = torch.zeros(1, 8, 2, 128, dtype=torch.bfloat16)
    f32, i64 = torch.zeros(8), torch.zeros(8, dtype=torch.int64)
    chunk = G.bwd_plan(1, 8, 2, 2, 128, 2, False, 1 << 20)[0]
    with pytest.raises(ValueError, match="the wgmma kernel needs top_k"):
        G.bwd_launch("moba_bwd_wg_bf16_d128", q, q, q, q, f32, i64, i64, f32, f32, q, q, f32, f32, seqlen=8, heads=2,
                     kv_heads=2, block_size=128, n_blocks=1, chunk=chunk, n_seg=1, causal=True, scale=0.1, sub0=0,
                     n_sub_launch=1, dq_mode=0, dkv_mode=0, smem=G.bwd_smem_bytes(128, "wgmma"), variant="wgmma")


def test_block_variant_geometry_and_choice(monkeypatch):
    """The "block" variant: 128 keys and 8 warps per CTA, shared memory within an H100 / H200's opt-in 227 KB at
    both head dims; chosen by argument or $MOBALAB_BWD_VARIANT, refused (with what is supported) where it has no
    kernel; the default "auto" takes it at head dim 128 where it has a kernel and "tile" elsewhere."""
    assert G.n_key_subtiles(128, "block") == 1 and G.n_key_subtiles(512, "block") == 4
    assert G.n_key_subtiles(128) == 2 and G.bwd_threads(128, "block") == 256 and G.bwd_threads(128) == 128
    assert G.bwd_smem_bytes(128, "block") == 2 * 128 * 256 + 4 * 64 * 256 + 2 * 128 * 64 * 2 + 3 * 64 * 16
    assert all(G.bwd_smem_bytes(d, "block") + 1024 <= 227 * 1024 for d in G.BLOCK_HEAD_DIMS)
    monkeypatch.delenv(G.BWD_VARIANT_ENV, raising=False)
    assert G.resolve_bwd_variant(None, 128, 128) == "block" and G.resolve_bwd_variant(None, 128, 512) == "block"
    for dim, block in ((96, 128), (128, 64), (256, 128), (64, 32), (32, 128), (64, 128)):
        assert G.resolve_bwd_variant(None, dim, block) == "tile"
    assert G.resolve_bwd_variant(None) == "auto" and G.resolve_bwd_variant("tile", 128, 128) == "tile"
    monkeypatch.setenv(G.BWD_VARIANT_ENV, "block")
    assert G.resolve_bwd_variant(None, 128, 256) == "block"
    for dim, block in ((96, 128), (128, 64), (256, 128), (64, 32)):
        with pytest.raises(ValueError, match="supports head_dim in"):
            G.resolve_bwd_variant(None, dim, block)
    with pytest.raises(ValueError, match="must be one of"):
        G.resolve_bwd_variant("fast")
    q, k, v = _qkv(1, 40, 2, 1, 96, torch.bfloat16)
    topk = torch.zeros(1, 40, 2, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="moba_attention_backward_cuda: backward variant 'block' supports"):
        G.moba_attention_backward_cuda(q, q, k, v, q, torch.zeros(1, 40, 2), topk, 128, 2, True, 0.1)


def test_wgmma_variant_geometry_and_choice(monkeypatch):
    """The "wgmma" variant: 128 keys and two warpgroups per CTA, its shared memory (with the 1 KB of alignment slack)
    within an H100 / H200's opt-in 227 KB; only by argument or $MOBALAB_BWD_VARIANT ("auto" does not take it), refused
    (with what is supported) at other head dims and block sizes, and on a GPU that is not sm_90; its kernels live in
    their own module."""
    assert G.n_key_subtiles(128, "wgmma") == 1 and G.n_key_subtiles(384, "wgmma") == 3
    assert G.bwd_threads(128, "wgmma") == 384
    # K, V, 3 x Q, 3 x dO, dS^T, the staged dQ rows, 5 x 64 row records and their pairs (the kernel builds them)
    assert G.bwd_smem_bytes(128, "wgmma") == 2 * 128 * 256 + 6 * 64 * 256 + 128 * 64 * 2 + 2 * 64 * 288 + 5 * 64 * 16 \
        + 5 * 64 * 8 + 1024
    assert G.bwd_smem_bytes(128, "wgmma") <= 227 * 1024
    assert G.bwd_kernel_names(torch.float16, 128, "wgmma")[1] == "moba_bwd_wg_f16_d128"
    assert G.bwd_kernel_names(torch.bfloat16, 128, "wgmma", dq16=True)[1] == "moba_bwd_wg_bf16_d128_dq16"
    assert set(signatures(G.WGMMA_SOURCE)) == {"moba_bwd_wg_bf16_d128", "moba_bwd_wg_f16_d128",
                                               "moba_bwd_wg_bf16_d128_dq16", "moba_bwd_wg_f16_d128_dq16"}
    # the other main kernels' parameters, with the rows' stats where they take the row records (the wgmma kernel
    # builds its records itself) and what a pair's query follows from
    block = signatures(G.SOURCE)["moba_bwd_blk_bf16_d128"]
    for name in signatures(G.WGMMA_SOURCE):
        sig = signatures(G.WGMMA_SOURCE)[name]
        assert [p.name for p in sig] == [p.name for p in block[:4]] + ["stats"] + [p.name for p in block[5:]] + \
            ["top_k", "n_q", "t0"]
        assert [(p.ctype, p.pointer) for p in sig[:len(block)]] == [(p.ctype, p.pointer) for p in block]
    monkeypatch.delenv(G.BWD_VARIANT_ENV, raising=False)
    assert G.resolve_bwd_variant(None, 128, 128) == "block"
    monkeypatch.setenv(G.BWD_VARIANT_ENV, "wgmma")
    assert G.resolve_bwd_variant(None, 128, 256) == "wgmma"
    for dim, block in ((64, 128), (128, 64), (256, 128), (96, 256)):
        with pytest.raises(ValueError, match="backward variant 'wgmma' supports head_dim in"):
            G.resolve_bwd_variant(None, dim, block)
    monkeypatch.delenv(G.BWD_VARIANT_ENV)
    cuda = torch.device("cuda", 0)
    for cap, want in (((9, 0), "wgmma"), ((8, 0), "block"), ((8, 9), "block")):
        monkeypatch.setattr(G, "device_capability", lambda device, cap=cap: cap)
        assert G.resolve_bwd_variant(None, 128, 256, cuda) == want  # "auto" by compute capability
        assert G.resolve_bwd_variant("block", 128, 256, cuda) == "block"
        assert G.resolve_bwd_variant(None, 64, 256, cuda) == "tile"
    assert G.resolve_bwd_variant(None, 128, 64, cuda) == "tile" and G.resolve_bwd_variant(None, 64, 128, cuda) == "tile"
    assert G.resolve_bwd_variant(None, 128, 128, torch.device("cpu")) == "block"
    with pytest.raises(ValueError, match="needs an sm_90"):
        G.check_variant_device("wgmma", cuda)
    G.check_variant_device("wgmma", torch.device("cpu"))  # the host emulation
    G.check_variant_device("block", torch.device("cuda", 0))


def test_dq_accumulator_choice(monkeypatch):
    """The atomic dQ adds into a dQ of the input type by default for bf16 on the "wgmma" kernel only (fp16, whose range
    a partial sum might leave, and the mma.sync kernels keep fp32); "fp32" and "input" force either (by argument or
    $MOBALAB_BWD_DQ_ACC), "input" refused with what is supported on a kernel that has no such mode."""
    monkeypatch.delenv(G.DQ_ACCUMULATOR_ENV, raising=False)
    bf16, f16 = torch.bfloat16, torch.float16
    assert G.dq_accumulates_in_input_type("wgmma", bf16)
    assert not G.dq_accumulates_in_input_type("wgmma", f16)
    assert not any(G.dq_accumulates_in_input_type(v, bf16) for v in ("tile", "block"))
    assert not G.dq_accumulates_in_input_type("wgmma", bf16, "fp32")
    assert G.dq_accumulates_in_input_type("wgmma", f16, "input")
    monkeypatch.setenv(G.DQ_ACCUMULATOR_ENV, "fp32")
    assert not G.dq_accumulates_in_input_type("wgmma", bf16)
    monkeypatch.setenv(G.DQ_ACCUMULATOR_ENV, "input")
    assert G.dq_accumulates_in_input_type("wgmma", f16)
    with pytest.raises(ValueError, match="needs the backward variant 'wgmma', got 'block'"):
        G.dq_accumulates_in_input_type("block", bf16)
    with pytest.raises(ValueError, match=r"dQ accumulator must be one of \('auto', 'fp32', 'input'\)"):
        G.dq_accumulates_in_input_type("wgmma", bf16, "bf16")


def test_check_args_catches_python_scalars():
    plans, _ = _plans(torch.bfloat16, 64, 16, False)
    main = plans[2]
    args = list(main.args)
    assert isinstance(args[23], np.float32) and isinstance(args[24], np.float32)
    assert abs(float(args[24]) - 0.125 * A.LOG2E) < 1e-6
    for i, bad in ((23, 0.125), (14, 21)):
        wrong = list(args)
        wrong[i] = bad
        with pytest.raises(TypeError, match="scalar"):
            check_args(G.SOURCE, main.kernel, tuple(wrong))
    q = torch.zeros(1, 2, 2, 64, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="n_rows"):
        check_args(G.SOURCE, G.bwd_kernel_names(torch.bfloat16, 64)[0],
                   (q, q, torch.zeros(8), 0, np.int32(4), np.int32(3)))


def test_sizes_and_plans():
    assert G.n_key_subtiles(16) == 1 and G.n_key_subtiles(64) == 1 and G.n_key_subtiles(512) == 8
    assert G.bwd_smem_bytes(128) == 6 * 64 * 128 * 2 + 64 * 64 * 2 + 3 * 64 * 16
    assert 2 * (G.bwd_smem_bytes(128) + 1024) <= 228 * 1024  # two CTAs per SM
    assert G.bwd_bytes_per_pair(128, True) - G.bwd_bytes_per_pair(128, False) == 512
    # the benchmark shape fits whole sequences per chunk (dK/dV written once, no fp32 accumulators)
    for det in (False, True):
        chunks = G.bwd_plan(2, 65536, 16, 16, 128, 8, det)
        assert all(G.dkv_mode(c, 65536) == 0 for c in chunks)
    # a small budget splits query ranges: first range stores, later ranges add
    chunks = G.bwd_plan(1, 5000, 8, 2, 64, 8, True, 1 << 20)
    modes = [G.dkv_mode(c, 5000) for c in chunks]
    assert modes[0] == 1 and 2 in modes and 0 not in modes
    covered = sorted((c.h0, c.t0, c.n_q) for c in chunks)
    for h0 in (0, 4):
        ranges = [(t0, n) for h, t0, n in covered if h == h0]
        assert ranges[0][0] == 0 and sum(n for _, n in ranges) == 5000


def test_backward_wrapper_validates_before_the_device():
    q, k, v = _qkv(1, 40, 2, 1, 64, torch.bfloat16)
    topk = torch.zeros(1, 40, 2, 2, dtype=torch.int32)
    lse = torch.zeros(1, 40, 2)
    args = dict(dout=q, q=q, k=k, v=v, out=q, lse=lse, topk=topk, block_size=16, top_k=2, causal=True, scale=0.125)
    for change, match in [(dict(dout=q[:, :-1]), "dout has shape"), (dict(out=q.half()), "out has dtype"),
                          (dict(lse=lse[..., :1]), "lse has shape"), (dict(topk=topk[..., :1]), "topk has shape"),
                          (dict(block_size=24), "block_size=24"), (dict(scale=float("inf")), "softmax_scale"),
                          (dict(), "needs CUDA tensors")]:
        with pytest.raises(ValueError, match=match):
            G.moba_attention_backward_cuda(**(args | change))
    f32 = [torch.zeros(x.shape) for x in (q, k, v)]
    for into, match in [(f32[:2], "into must be"), ([f32[0].half(), *f32[1:]], "into dq has dtype"),
                        ([f32[0], f32[0], f32[2]], "into dk has shape"),
                        ([f32[0], f32[1], torch.zeros(*v.shape[:3], 128)[..., ::2]], "into dv must be contig")]:
        with pytest.raises(ValueError, match=match):
            G.moba_attention_backward_cuda(**args, into=into)


def test_backward_wrapper_refuses_integer_gradients_and_a_16bit_lse():
    q, k, v = _qkv(1, 40, 2, 1, 64, torch.bfloat16)
    topk = torch.zeros(1, 40, 2, 2, dtype=torch.int32)
    lse = torch.zeros(1, 40, 2)
    args = dict(dout=q, q=q, k=k, v=v, out=q, lse=lse, topk=topk, block_size=16, top_k=2, causal=True, scale=0.125)
    for change, match in [(dict(dout=q.long()), "dout has dtype torch.int64"),
                          (dict(lse=lse.bfloat16()), "lse has dtype torch.bfloat16; supported: torch.float32"),
                          (dict(lse=lse.long()), "lse has dtype torch.int64"),
                          (dict(dlse=lse.int()), "dlse has dtype torch.int32"),
                          (dict(kv_fresh=1), "kv_fresh must be True or False")]:
        with pytest.raises(ValueError, match=match):
            G.moba_attention_backward_cuda(**(args | change))
    for change in (dict(dout=q.float()), dict(dlse=lse.bfloat16())):  # float gradients are rounded as before
        with pytest.raises(ValueError, match="needs CUDA tensors"):
            G.moba_attention_backward_cuda(**(args | change))


# ---------------------------------------------------------------------------------------------------
# the op on CPU (reference inside), autograd wiring, compile


def test_validation():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="deterministic must be True or False"):
        moba_attention_autograd(q, k, v, 4, 2, deterministic=1)
    with pytest.raises(ValueError, match="block_size"):
        moba_attention_autograd(q, k, v, 0, 2)
    with pytest.raises(ValueError, match="softmax_scale"):
        moba_attention_autograd(q, k, v, 4, 2, softmax_scale=float("inf"))
    with pytest.raises(ValueError, match="multiple of kv heads"):
        moba_attention_autograd(q[:, :, :3], k, v, 4, 2)
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        moba_attention_autograd(q.numpy(), k, v, 4, 2)
    with pytest.raises(ValueError, match="deterministic must be True or False"):
        K.moba_attention(q, k, v, 4, 2, deterministic="yes")


@pytest.mark.parametrize("causal", [True, False])
def test_op_matches_reference_autograd(causal):
    q, k, v = _qkv(batch=2, seed=1)
    a = [x.clone().requires_grad_() for x in (q, k, v)]
    b = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = moba_attention_autograd(*a, 4, 2, causal=causal, return_lse=True, softmax_scale=0.7)
    ro, rl = R.moba_attention(*b, 4, 2, causal=causal, return_lse=True, softmax_scale=0.7)
    torch.testing.assert_close(out, ro, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, rl, rtol=0, atol=1e-12)
    w = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(2))
    w2 = torch.randn(lse.shape, dtype=lse.dtype, generator=torch.Generator().manual_seed(3))
    ((out * w).sum() + (lse * w2).sum()).backward()
    ((ro * w).sum() + (rl * w2).sum()).backward()
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("eager_function", [True, False])
def test_gradcheck_of_the_op(monkeypatch, eager_function):
    """Both entries: the eager autograd.Function and the custom ops (what torch.compile traces)."""
    monkeypatch.setattr(AG, "EAGER_FUNCTION", eager_function)
    q, k, v = _qkv(batch=1, seqlen=10, heads=2, kv_heads=1, dim=4, seed=4)
    leaves = tuple(x.requires_grad_() for x in (q, k, v))
    fn = lambda q, k, v: moba_attention_autograd(q, k, v, 3, 2, causal=True, return_lse=True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("extra", [(), ("input",)])
def test_opcheck_forward_op(extra):
    q, k, v = _qkv(seed=8)
    torch.library.opcheck(torch.ops.mobalab.moba_attention_fwd.default,
                          (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), 4, 2, True, 0.3, False,
                           *extra))


@pytest.mark.parametrize("eager_function", [True, False])
def test_input_centroids_reach_the_routing(monkeypatch, eager_function):
    """centroid_precision "input" through both entries: the routing of the reference in that precision (bf16 keys
    whose fp32 block means round to different bf16 values), and a clear error for an unknown precision."""
    monkeypatch.setattr(AG, "EAGER_FUNCTION", eager_function)
    q, k, v = (x.to(torch.bfloat16) for x in _qkv(batch=1, seqlen=64, heads=2, kv_heads=1, dim=8, seed=12))
    out, lse = moba_attention_autograd(q, k, v, 4, 3, return_lse=True, centroid_precision="input")
    topk = R.moba_topk(q, k, 4, 3, centroid_precision="input")
    ref_out, ref_lse = R.moba_attention_given_routing(q, k, v, topk, 4)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=0)
    with pytest.raises(ValueError, match="centroid_precision must be one of"):
        moba_attention_autograd(q, k, v, 4, 3, centroid_precision="fp16")


def test_torch_compile_fullgraph_cpu(monkeypatch):
    q, k, v = _qkv(seed=9)

    def f(q, k, v):
        return torch.tanh(moba_attention_autograd(q, k, v, 4, 2, causal=True)).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")  # fullgraph: a graph break would raise
    a = [x.clone().requires_grad_() for x in (q, k, v)]
    b = [x.clone().requires_grad_() for x in (q, k, v)]
    eager_calls = []
    real = AG._EagerMoba.apply
    monkeypatch.setattr(AG._EagerMoba, "apply", lambda *args: eager_calls.append(1) or real(*args))
    compiled(*a).backward()
    assert not eager_calls  # compiled: the custom ops
    f(*b).backward()
    assert eager_calls == [1]  # eager: the autograd.Function
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-10, atol=1e-12)


def test_backward_checked_runs_what_the_checked_entry_runs(monkeypatch):
    """The training step's backward (backward_checked, behind the autograd function) hands _backward exactly what
    moba_attention_backward_cuda hands it after its checks, and names the backward in a refused variant."""
    q, k, v = _qkv(seed=10, dtype=torch.bfloat16, dim=128, seqlen=64)
    out, dout = torch.randn_like(q), torch.randn_like(q)
    lse = torch.randn(q.shape[:3])
    topk = torch.zeros(q.shape[:3] + (2,), dtype=torch.int32)
    calls = []
    monkeypatch.setattr(G, "_backward", lambda *args: calls.append(args))
    monkeypatch.setattr(C, "check_cuda_device", lambda fn, x: None)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    for variant in (None, "tile"):
        if variant is not None:
            monkeypatch.setenv(G.BWD_VARIANT_ENV, variant)
        for lists, dlse in ((torch.empty(0, dtype=torch.int64), None), (torch.zeros(6, dtype=torch.int64), lse)):
            calls.clear()
            G.moba_attention_backward_cuda(dout, q, k, v, out, lse, topk, 16, 2, True, 0.1, dlse=dlse, fwd_lists=lists)
            G.backward_checked(dout, q, k, v, out, lse, topk, 16, 2, True, 0.1, False, dlse, lists)
            assert len(calls) == 2 and len(calls[0]) == len(calls[1])
            assert all(a is b or a == b for a, b in zip(*calls, strict=True)), calls
    monkeypatch.setenv(G.BWD_VARIANT_ENV, "block")
    with pytest.raises(ValueError, match="moba_attention_backward_cuda: backward variant 'block' supports"):
        G.backward_checked(dout, q, k, v, out, lse, topk, 16, 2, True, 0.1, False, None, lists)


def test_forward_lists_are_kept_where_the_backward_can_read_or_gather_them():
    """The backward takes the forward's lists as they are where the plans are the same chunks (the benchmark's 8K
    and 16K: one chunk per sequence; 512K: two whole heads a chunk, the forward's larger budget at long context;
    grouped heads at 512K, a kv group's queries split alike), gathered where the forward splits the heads finer
    (32K, 64K) or a head's queries (a forward budget below its default at 512K: two chunks per head, one head each),
    not where the forward splits a kv group's queries otherwise than the backward or the backward's chunks split
    queries the forward's do not (deterministic at 512K). The kept lists' layout is 8 bytes per pair plus the
    segment offsets, each chunk 16-byte aligned."""
    for n in (8192, 16384):
        assert G.forward_lists_reusable(2, n, 16, 16, 128, 8, False)
        assert G.forward_plan(2, n, 16, 16, 128, 8) == G.bwd_plan(2, n, 16, 16, 128, 8, False)
    for n in (32768, 65536):
        assert G.forward_lists_reusable(2, n, 16, 16, 128, 8, False)
        assert len(G.forward_plan(2, n, 16, 16, 128, 8)) > len(G.bwd_plan(2, n, 16, 16, 128, 8, False))
    n = 524288
    fwd, bwd = G.forward_plan(2, n, 16, 16, 128, 8), G.bwd_plan(2, n, 16, 16, 128, 8, False)
    assert fwd == bwd and {(c.n_heads, c.t0, c.n_q) for c in bwd} == {(2, 0, n)}
    assert G.forward_lists_reusable(2, n, 16, 16, 128, 8, False)
    split = A.plan_chunks(2, n, 16, 16, 128, 8, A.default_scratch_budget(2, n, 16, 16, 128))
    assert {(c.n_heads, c.n_q) for c in split} == {(1, n // 2)}
    assert G.lists_serve(split, bwd, n) and not G.lists_serve(split, split[:1] + bwd, n)  # a backward chunk not whole
    assert G.forward_plan(2, n, 32, 8, 128, 8) == G.bwd_plan(2, n, 32, 8, 128, 8, False)
    assert G.forward_lists_reusable(2, n, 32, 8, 128, 8, False)
    grouped_split = A.plan_chunks(2, n, 32, 8, 128, 8, 768 << 20)  # split chunks of a kv group of 4 heads
    assert not G.lists_serve(grouped_split, G.bwd_plan(2, n, 32, 8, 128, 8, False), n)
    assert not G.forward_lists_reusable(2, n, 16, 16, 128, 8, True)
    chunks = G.bwd_plan(2, 8192, 16, 16, 128, 8, False)
    layout, total = A.kept_lists_layout(chunks, 8, 64, 1)
    n_pairs, n_seg = 8192 * 16 * 8, 16 * 64
    assert layout == [(0, n_pairs, n_pairs, n_seg), (n_pairs + n_seg + 2, n_pairs, 2 * n_pairs + n_seg + 2, n_seg)]
    assert total == 2 * (n_pairs + n_seg + 2) and all(p0 % 2 == 0 for p0, *_ in layout)


def test_kept_lists_are_checked(monkeypatch):
    """keep_lists needs return_lse and no into=; fwd_lists must be a 1-d int64 tensor of the forward's layout."""
    from mobalab.kernels._cuda_attention import moba_attention_cuda

    q, k, v = _qkv(1, 40, 2, 1, 64, torch.bfloat16)
    with pytest.raises(ValueError, match="keep_lists=True returns"):
        moba_attention_cuda(q, k, v, 16, 2, keep_lists=True)
    topk = torch.zeros(1, 40, 2, 2, dtype=torch.int32)
    args = (q, q, k, v, q, torch.zeros(1, 40, 2), topk, 16, 2, True, 0.1)
    with pytest.raises(ValueError, match="fwd_lists must be a contiguous 1-d int64"):
        G.moba_attention_backward_cuda(*args, fwd_lists=torch.zeros(2, 3, dtype=torch.int64))


def test_segments_start_longest_first(monkeypatch):
    """The main kernel's CTAs take the segments by descending tile count (64 rows), equal counts in segment order,
    an empty segment last: one launch of moba_pairs_longest_first (emulated in test_pairs_cpu.py), or the torch
    sort past the kernel's shared memory."""
    seg_off = torch.tensor([0, 3, 3, 100, 164, 300, 301], dtype=torch.int64)  # sizes 3, 0, 97, 64, 136, 1
    launched = []
    monkeypatch.setattr(G, "launch", launched.append)
    order = G.longest_first(seg_off, 6)
    assert order.dtype == torch.int32 and order.shape == (6,)
    (plan,) = launched
    assert plan.kernel == "moba_pairs_longest_first" and plan.args[3] is order and plan.shared_mem == 24
    check_args(plan.source, plan.kernel, plan.args)
    assert P.longest_first_reference(seg_off, 6, G.ROWS).tolist() == [4, 2, 0, 3, 5, 1]
    monkeypatch.setattr(P, "MAX_ORDER_SEGMENTS", 5)
    assert G.longest_first(seg_off, 6).tolist() == [4, 2, 0, 3, 5, 1] and len(launched) == 1
    plans, _ = _plans(torch.bfloat16, 64, 16, False)
    assert plans[2].args[7] == 0  # a plan without an order passes a null pointer: segment order


def test_longest_first_where_it_measured_faster():
    """Only the "block" variant, and only launches of at most LONGEST_FIRST_MAX_WAVES waves (one CTA per SM)."""
    assert G.orders_longest_first("block", 1024, 132) and G.orders_longest_first("block", 16 * 132, 132)
    assert not G.orders_longest_first("block", 16 * 132 + 1, 132)
    assert not G.orders_longest_first("tile", 100, 132)
