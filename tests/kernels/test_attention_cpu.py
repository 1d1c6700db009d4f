"""CPU checks of the CUDA attention wrapper: validation, launch ABI (the plans against the CUDA signatures),
chunk planning, variant choice."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from mobalab.kernels import _contract as C
from mobalab.kernels import _cuda_attention as A
from mobalab.kernels import _cuda_backward as G
from mobalab.kernels import _launch
from mobalab.kernels._launch import check_args, signatures


def _qkv(batch=1, seqlen=40, heads=2, kv_heads=1, dim=64, dtype=torch.bfloat16, device="cpu"):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, seqlen, heads, dim, generator=g).to(dtype).to(device)
    k = torch.randn(batch, seqlen, kv_heads, dim, generator=g).to(dtype).to(device)
    v = torch.randn(batch, seqlen, kv_heads, dim, generator=g).to(dtype).to(device)
    return q, k, v


# ---------------------------------------------------------------------------------------------------
# validation (every check runs before the device check, so CPU tensors reach each message)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(dtype=torch.float32), "dtype torch.float32"),
        (dict(dim=48), "head_dim 48 is not supported"),
        (dict(block_size=48), "block_size=48 is not supported"),
        (dict(block_size=1024), "block_size=1024 is not supported"),
        (dict(block_size=True), "block_size=True"),
        (dict(top_k=0), "top_k=0 is not supported"),
        (dict(top_k=65), "top_k=65 is not supported"),
        (dict(top_k=2.0), "top_k=2.0"),
        (dict(causal=1), "causal must be True or False"),
        (dict(return_lse=None), "return_lse must be True or False"),
        (dict(softmax_scale=float("nan")), "softmax_scale must be a finite"),
        (dict(softmax_scale="1"), "softmax_scale must be a finite"),
        (dict(kv_heads=3, heads=4), "multiple of kv heads"),
        (dict(variant="fast"), "variant must be one of"),
        (dict(scratch_budget_bytes=0), "scratch_budget_bytes must be an integer >= 1"),
        (dict(), "needs CUDA tensors"),
    ],
)
def test_validation_messages(change, match):
    shape = {k: change.pop(k) for k in ("dtype", "dim", "kv_heads", "heads") if k in change}
    q, k, v = _qkv(**shape)
    kwargs = dict(block_size=16, top_k=2, causal=True, softmax_scale=None, return_lse=False)
    kwargs.update(change)
    with pytest.raises(ValueError, match=match):
        A.moba_attention_cuda(q, k, v, **kwargs)


def test_validation_shapes_and_indices():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="4-D"):
        A.moba_attention_cuda(q[0], k, v, 16, 2)
    with pytest.raises(ValueError, match="same shape"):
        A.moba_attention_cuda(q, k, v[:, :-1], 16, 2)
    with pytest.raises(ValueError, match="seqlen differs"):
        A.moba_attention_cuda(q[:, :-1], k, v, 16, 2)
    with pytest.raises(ValueError, match="share one dtype"):
        A.moba_attention_cuda(q, k.half(), v, 16, 2)
    with pytest.raises(ValueError, match="empty dimension"):
        A.moba_attention_cuda(q[:, :0], k[:, :0], v[:, :0], 16, 2)
    with pytest.raises(TypeError, match="q must be a torch.Tensor, got numpy.ndarray"):
        A.moba_attention_cuda(q.float().numpy(), k, v, 16, 2)
    idx = torch.zeros(1, 40, 2, 3, dtype=torch.int32)
    with pytest.raises(ValueError, match="topk_indices has shape"):
        A.moba_attention_cuda(q, k, v, 16, 2, topk_indices=idx)
    with pytest.raises(ValueError, match="topk_indices has dtype"):
        A.moba_attention_cuda(q, k, v, 16, 3, topk_indices=idx.float())


def test_validation_of_fold_and_of_a_variant_without_a_kernel():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="moba_attention_cuda: fold must be True or False"):
        A.moba_attention_cuda(q, k, v, 16, 2, fold=1)
    with pytest.raises(ValueError, match="moba_attention_cuda: fold=True .* needs into="):
        A.moba_attention_cuda(q, k, v, 16, 2, fold=True)
    with pytest.raises(ValueError, match="moba_attention_cuda: variant 'wgmma' supports head_dim"):
        A.moba_attention_cuda(q, k, v, 16, 2, variant="wgmma")


# ---------------------------------------------------------------------------------------------------
# launch ABI: every variant's plans match their CUDA signatures


def test_every_variant_is_in_the_source():
    sigs = signatures(A.SOURCE)
    for dtype in C.CUDA_DTYPES:
        for dim in C.CUDA_HEAD_DIMS:
            for block in C.CUDA_BLOCK_SIZES:
                for variant in A.MMA_VARIANTS:
                    fwd, merge = A.kernel_names(dtype, dim, block, variant)
                    assert fwd in sigs and merge in sigs
    assert {"moba_attn_keys", "moba_attn_bounds", "moba_attn_segments"} <= set(sigs)


def test_variant_choice(monkeypatch):
    assert A.resident(128, 128, "auto") and not A.resident(128, 256, "auto")
    assert A.resident(64, 256, "auto") and not A.resident(64, 512, "auto")
    assert not A.resident(128, 64, "streaming") and not A.resident(128, 512, "resident")
    assert A.rows_per_unit(128, 128, "auto") == A.ROWS * A.TILES_PER_UNIT
    assert A.rows_per_unit(128, 512, "auto") == A.ROWS
    assert A.kernel_names(torch.bfloat16, 128, 128, "auto")[0] == "moba_attn_res_bf16_d128_kt64"
    assert A.kernel_names(torch.float16, 64, 32, "streaming")[0] == "moba_attn_fwd_f16_d64_kt32"
    with pytest.raises(ValueError, match="variant must be one of"):
        A.resident(64, 64, "fast")
    # None: the environment variable, read at call time
    monkeypatch.setenv(A.VARIANT_ENV, "streaming")
    assert not A.resident(128, 128) and A.resolve_variant(None) == "streaming"
    monkeypatch.delenv(A.VARIANT_ENV)
    assert A.resident(128, 128) and A.resolve_variant(None) == "auto"


def _plans(dtype, dim, block, causal, variant, batch=2, seqlen=100, heads=4, kv_heads=2, top_k=3, partial="16bit"):
    q, k, v = _qkv(batch, seqlen, heads, kv_heads, dim, dtype)
    topk = torch.zeros(batch, seqlen, heads, top_k, dtype=torch.int32)
    n_blocks = math.ceil(seqlen / block)
    chunk = A.plan_chunks(batch, seqlen, heads, kv_heads, dim, top_k, 1 << 20)[0]
    n_pairs = chunk.n_heads * chunk.n_q * top_k
    n_seg = chunk.n_heads // (heads // kv_heads) * n_blocks
    keys = torch.zeros(n_pairs, dtype=torch.int32)
    pairs = torch.zeros(n_pairs, dtype=torch.int64)
    seg = torch.zeros(n_seg + 1, dtype=torch.int64)
    part_o = torch.zeros(n_pairs * dim, dtype=A.partial_dtype(dtype, partial))
    part_ml = torch.zeros(n_pairs * 2)
    out, lse = torch.empty_like(q), torch.empty(batch, seqlen, heads)
    fwd, merge = A.kernel_names(dtype, dim, block, variant)
    unit = A.rows_per_unit(dim, block, variant)
    return [
        A.keys_launch(topk, keys, seqlen, heads, top_k, n_blocks, chunk, 2),
        A.bounds_launch(keys, n_pairs, n_seg, seg),
        A.segments_launch(seg, n_seg, unit, seg),
        A.fwd_launch(fwd, q, k, v, pairs, seg, seg, part_o, part_ml, seqlen=seqlen, heads=heads, kv_heads=kv_heads,
                     top_k=top_k, block_size=block, n_blocks=n_blocks, chunk=chunk, n_pairs=n_pairs, n_seg=n_seg,
                     causal=causal, scale_log2=0.18, rows_per_unit=unit, smem=A.fwd_smem_bytes(dim, block, variant),
                     partial=partial),
        A.merge_launch(merge, part_o, part_ml, topk, out, lse, seqlen=seqlen, heads=heads, top_k=top_k,
                       n_blocks=n_blocks, chunk=chunk, write_lse=True, partial=partial),
    ]


@pytest.mark.parametrize("dtype", C.CUDA_DTYPES)
@pytest.mark.parametrize("dim", C.CUDA_HEAD_DIMS)
@pytest.mark.parametrize("block", C.CUDA_BLOCK_SIZES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("variant", ["auto", "streaming"])
def test_launch_args_match_signatures(dtype, dim, block, causal, variant):
    for plan in _plans(dtype, dim, block, causal, variant):
        assert plan.source == A.SOURCE
        assert len(check_args(plan.source, plan.kernel, plan.args)) == len(signatures(A.SOURCE)[plan.kernel])


def test_launch_geometry():
    keys, bounds, segments, fwd, merge = _plans(torch.bfloat16, 128, 128, True, "auto")
    chunk = A.plan_chunks(2, 100, 4, 2, 128, 3, 1 << 20)[0]
    n_pairs = chunk.n_heads * chunk.n_q * 3
    assert keys.grid == (math.ceil(n_pairs / 256),) and keys.block == (256,)
    assert bounds.grid == (math.ceil((n_pairs + 1) / 256),) and segments.grid == (1,) and segments.block == (512,)
    assert fwd.block == (A.fwd_threads(128),) and fwd.shared_mem == A.fwd_smem_bytes(128, 128, "auto")
    assert fwd.grid == (A.fwd_grid(n_pairs, chunk.n_heads // 2, A.ROWS * A.TILES_PER_UNIT),)
    assert merge.grid == (math.ceil(chunk.n_heads * chunk.n_q / 8),) and merge.block == (A.MERGE_THREADS,)
    assert keys.shared_mem == bounds.shared_mem == merge.shared_mem == 0


# ---------------------------------------------------------------------------------------------------
# partial format: o in the input dtype (default) or fp32, see docs/design.md, "FLOP and byte budget"


def test_partial_format_resolver(monkeypatch):
    monkeypatch.delenv(A.PARTIAL_ENV, raising=False)
    assert A.resolve_partial(None) == "16bit"
    assert A.resolve_partial("fp32") == "fp32" and A.resolve_partial("16bit") == "16bit"
    monkeypatch.setenv(A.PARTIAL_ENV, "fp32")
    assert A.resolve_partial(None) == "fp32"
    assert A.resolve_partial("16bit") == "16bit"  # an explicit format wins over the environment
    for bad in ("bf16", "FP32", ""):
        monkeypatch.setenv(A.PARTIAL_ENV, bad)
        with pytest.raises(ValueError, match=f"partial format must be one of .*MOBALAB_ATTN_PARTIAL.*got {bad!r}"):
            A.resolve_partial(None)
    with pytest.raises(ValueError, match="got 'fp16'"):
        A.partial_dtype(torch.float16, "fp16")
    # the wrapper reads the variable before the device check, so a bad value is reported for CPU tensors too
    monkeypatch.setenv(A.PARTIAL_ENV, "half")
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="partial format must be one of"):
        A.moba_attention_cuda(q, k, v, 16, 2)


@pytest.mark.parametrize("partial", A.PARTIALS)
@pytest.mark.parametrize("dtype", C.CUDA_DTYPES)
@pytest.mark.parametrize("dim", C.CUDA_HEAD_DIMS)
def test_partial_format_plans(partial, dtype, dim):
    keys, bounds, segments, fwd, merge = _plans(dtype, dim, 64, True, "auto", partial=partial)
    want_dtype = torch.float32 if partial == "fp32" else dtype
    want_defines = ("MOBA_PARTIAL_FP32=1",) if partial == "fp32" else ()
    assert fwd.defines == merge.defines == want_defines
    assert keys.defines == bounds.defines == segments.defines == ()  # index building is format-free
    part_o, part_ml = fwd.args[6], fwd.args[7]
    assert merge.args[0] is part_o and merge.args[1] is part_ml
    assert part_o.dtype == want_dtype and part_ml.dtype == torch.float32
    n_pairs = part_ml.numel() // 2
    assert part_o.numel() * part_o.element_size() == n_pairs * dim * (4 if partial == "fp32" else 2)
    for plan in (fwd, merge):
        assert len(check_args(plan.source, plan.kernel, plan.args)) == len(signatures(A.SOURCE)[plan.kernel])
    # the kernel signature takes part_o as void*: a mismatched buffer is caught by the plan, not by the ABI
    other = torch.zeros(part_o.numel(), dtype=dtype if partial == "fp32" else torch.float32)
    args = dict(seqlen=100, heads=4, kv_heads=2, top_k=3, block_size=64, n_blocks=2, chunk=A.Chunk(0, 0, 4, 0, 100),
                n_pairs=n_pairs, n_seg=4, causal=True, scale_log2=0.18, rows_per_unit=256, smem=0, partial=partial)
    with pytest.raises(ValueError, match=f"part_o has dtype {other.dtype}"):
        A.fwd_launch(fwd.kernel, *fwd.args[:6], other, part_ml, **args)
    with pytest.raises(ValueError, match=f"part_o has dtype {other.dtype}"):
        A.merge_launch(merge.kernel, other, *merge.args[1:5], seqlen=100, heads=4, top_k=3, n_blocks=2,
                       chunk=A.Chunk(0, 0, 4, 0, 100), write_lse=True, partial=partial)


def test_launch_builds_the_module_of_the_plan_defines(monkeypatch):
    """launch() compiles with -DMOBA_HEAD_DIM from the kernel name plus the plan's own defines."""
    seen = []

    def fake_get_kernel(filename, kernel, *, defines=(), name_expressions=(), max_dynamic_smem=0):
        seen.append((filename, kernel, defines))
        return lambda grid, block, args, shared_mem=0, stream=None: None

    monkeypatch.setattr(_launch, "get_kernel", fake_get_kernel)
    monkeypatch.setattr(_launch, "torch_stream", lambda: None)
    monkeypatch.setenv(_launch.LAUNCH_ENV, "cupy")
    for partial in A.PARTIALS:
        for plan in _plans(torch.bfloat16, 128, 128, True, "auto", partial=partial):
            _launch.launch(plan)
    dims = [d for (_, _, d) in seen]
    assert dims[:5] == [("MOBA_HEAD_DIM=1",)] * 3 + [("MOBA_HEAD_DIM=128",)] * 2
    assert dims[5:] == [("MOBA_HEAD_DIM=1",)] * 3 + [("MOBA_HEAD_DIM=128", "MOBA_PARTIAL_FP32=1")] * 2


def test_driver_launch_packs_every_argument_at_its_type(monkeypatch):
    """The default launcher hands cuLaunchKernel an array of pointers into one parameter block: read back through
    those pointers, every argument of every forward and backward plan is the value check_args passed, at its C
    type (pointers as 64-bit addresses), and grid, block, shared memory and stream are the plan's; the same when a
    plan's kernel is launched again (from the CUfunction kept at its first launch)."""
    import ctypes
    import types

    from mobalab.kernels import _cuda_backward as CB

    calls = []

    class Driver:
        class CUDADriverError(Exception):
            pass

        @staticmethod
        def launchKernel(f, gx, gy, gz, bx, by, bz, smem, stream, params, extra):
            calls.append((f, (gx, gy, gz), (bx, by, bz), smem, stream, params, extra))

    monkeypatch.setattr(_launch, "cupy", lambda: types.SimpleNamespace(cuda=types.SimpleNamespace(driver=Driver)))
    kernel = types.SimpleNamespace(kernel=types.SimpleNamespace(ptr=1234))  # a RawKernel's Function on the device
    monkeypatch.setattr(_launch, "get_kernel", lambda *a, **kw: kernel)
    monkeypatch.setattr(_launch, "current_stream", lambda: (0, 77))
    monkeypatch.setattr(_launch, "_FUNCTIONS", {})
    monkeypatch.setattr(_launch, "_READY", {})
    monkeypatch.delenv(_launch.LAUNCH_ENV, raising=False)
    plans = list(_plans(torch.bfloat16, 128, 128, True, "auto"))
    q = torch.zeros(1, 64, 2, 64, dtype=torch.bfloat16)
    plans.append(CB.bwd_launch("moba_bwd_bf16_d64", *([q] * 13), seqlen=64, heads=2, kv_heads=1, block_size=16,
                               n_blocks=4, chunk=A.Chunk(0, 0, 2, 0, 64), n_seg=4, causal=True, scale=0.125,
                               sub0=1, n_sub_launch=3, dq_mode=2, dkv_mode=1, smem=4096))
    ctype = {"int": ctypes.c_int32, "unsigned": ctypes.c_uint32, "long long": ctypes.c_int64, "float": ctypes.c_float,
             "bool": ctypes.c_bool}
    for plan in plans * 2:  # the second time from the kept CUfunction (no get_kernel)
        calls.clear()
        _launch.launch(plan)
        (f, grid, block, smem, stream, params, extra), = calls
        assert f == 1234 and stream == 77 and extra == 0 and smem == plan.shared_mem
        assert grid == (tuple(plan.grid) + (1, 1))[:3] and block == (tuple(plan.block) + (1, 1))[:3]
        want = _launch.check_args(plan.source, plan.kernel, plan.args)
        sig = _launch.signatures(plan.source)[plan.kernel]
        pointers = (ctypes.c_void_p * len(sig)).from_address(params)
        for p, w, addr in zip(sig, want, pointers, strict=True):
            got = (ctypes.c_uint64 if p.pointer else ctype[p.ctype]).from_address(addr).value
            assert got == (w if p.pointer else w.item()), f"{plan.kernel}: {p.name} = {got}, passed {w!r}"
    with pytest.raises(ValueError, match="launcher must be one of"):
        _launch.resolve_launcher("numba")


def test_kept_function_launch_without_a_current_context_falls_back_to_cupy(monkeypatch):
    """A kernel launched before, launched again from a thread without a current CUDA context (cuLaunchKernel answers
    CUDA_ERROR_INVALID_CONTEXT): CuPy's call makes the context current and launches it; other driver errors raise."""
    import types

    launched, status = [], []

    class DriverError(Exception):
        def __init__(self, code):
            super().__init__(code)
            self.status = code

    class Driver:
        CUDADriverError = DriverError

        @staticmethod
        def launchKernel(f, *args):
            if status:
                raise DriverError(status[0])
            launched.append("driver")

    class Kernel:
        kernel = types.SimpleNamespace(ptr=1234)

        def __call__(self, grid, block, args, shared_mem=0, stream=None):
            launched.append("cupy")

    monkeypatch.setattr(_launch, "cupy", lambda: types.SimpleNamespace(cuda=types.SimpleNamespace(driver=Driver)))
    monkeypatch.setattr(_launch, "get_kernel", lambda *a, **kw: Kernel())
    monkeypatch.setattr(_launch, "current_stream", lambda: (0, 77))
    monkeypatch.setattr(_launch, "torch_stream", lambda: None)
    monkeypatch.setattr(_launch, "_FUNCTIONS", {})
    monkeypatch.setattr(_launch, "_READY", {})
    monkeypatch.delenv(_launch.LAUNCH_ENV, raising=False)
    plan = next(iter(_plans(torch.bfloat16, 128, 128, True, "auto")))
    _launch.launch(plan)  # first launch: start(), the CUfunction kept
    status.append(_launch._INVALID_CONTEXT)
    _launch.launch(plan)  # kept function, no context: both driver calls refuse, CuPy's call launches
    assert launched == ["driver", "cupy"]
    status[0] = 1  # CUDA_ERROR_INVALID_VALUE
    with pytest.raises(DriverError):
        _launch.launch(plan)


def test_getenv_sees_every_change_of_the_environment(monkeypatch):
    """C.getenv answers what os.environ.get answers, after every way of setting and removing a variable."""
    name = "MOBALAB_TEST_GETENV"
    monkeypatch.delenv(name, raising=False)
    assert C.getenv(name) is None and C.getenv(name, "d") == "d"
    monkeypatch.setenv(name, "fp32")
    assert C.getenv(name, "d") == "fp32"
    os.environ[name] = "\u00e9 x"
    assert C.getenv(name) == os.environ.get(name) == "\u00e9 x"
    os.environ.update({name: ""})
    assert C.getenv(name, "d") == ""
    del os.environ[name]
    assert C.getenv(name, "d") == "d"
    monkeypatch.setenv(A.PARTIAL_ENV, "fp32")
    assert A.resolve_partial(None) == "fp32"
    monkeypatch.delenv(A.PARTIAL_ENV)
    assert A.resolve_partial(None) == "16bit"


def test_check_args_names_what_is_wrong():
    """Every refusal of check_args names the kernel and the parameter; a NULL pointer passes as the int 0."""
    plan = A.segments_launch(torch.zeros(5, dtype=torch.int64), 4, 64, torch.zeros(5, dtype=torch.int64))
    seg, n_seg, rows, cum = plan.args
    assert check_args(plan.source, plan.kernel, (seg, n_seg, rows, 0))[3] == 0
    bad = {
        "expected 4 arguments": (seg, n_seg, rows),
        "pointer argument seg_off must be contiguous": (torch.zeros(10, dtype=torch.int64)[::2], n_seg, rows, cum),
        r"pointer argument tile_cum \(long long\*\) got bool": (seg, n_seg, rows, True),
        r"pointer argument seg_off \(long long\*\) got float": (1.0, n_seg, rows, cum),
        r"scalar n_seg is C 'int' and needs int32, got int \(4\)": (seg, 4, rows, cum),
        r"scalar rows_per_unit is C 'int' and needs int32, got int64": (seg, n_seg, np.int64(64), cum),
    }
    for message, args in bad.items():
        with pytest.raises(TypeError, match=f"moba_attn_segments: {message}"):
            check_args(plan.source, plan.kernel, args)
    # arguments of types that passed before: the tensors are still looked at
    assert check_args(plan.source, plan.kernel, plan.args) == (seg.data_ptr(), n_seg, rows, cum.data_ptr())
    with pytest.raises(TypeError, match="moba_attn_segments: pointer argument tile_cum must be contiguous"):
        check_args(plan.source, plan.kernel, (seg, n_seg, rows, torch.zeros(10, dtype=torch.int64)[::2]))


def test_bytes_per_pair_counts_the_partial_format():
    for d in C.CUDA_HEAD_DIMS:
        # partial o, (m, l), segment key, sorted key, sort index, sort temp
        assert A.bytes_per_pair(d) == A.bytes_per_pair(d, "16bit") == 2 * d + 8 + 4 + 4 + 8 + 16
        assert A.bytes_per_pair(d, "fp32") == 4 * d + 8 + 4 + 4 + 8 + 16
    # the reference 64K forward (b 2, h 16, d 128, k 8): partial bytes written, then read by the merge
    pairs = 2 * 65536 * 16 * 8
    assert pairs * (2 * 128 + 8) * 2 / 1e9 == pytest.approx(8.86, abs=0.01)
    assert pairs * (4 * 128 + 8) * 2 / 1e9 == pytest.approx(17.45, abs=0.01)


def test_planner_uses_the_partial_bytes():
    # one kv group of 16 heads at 64K, k 8: 16-bit partials fit twice the queries in the same budget
    budget = A.default_scratch_budget(2, 65536, 16, 16, 128)
    half = A.plan_chunks(2, 65536, 16, 1, 128, 8, budget, "16bit")
    full = A.plan_chunks(2, 65536, 16, 1, 128, 8, budget, "fp32")
    assert len(half) < len(full)
    for chunks, partial in ((half, "16bit"), (full, "fp32")):
        # the largest chunk's scratch fits the budget and fills more than half of it
        scratch = max(c.n_heads * c.n_q * 8 for c in chunks) * A.bytes_per_pair(128, partial)
        assert budget / 2 < scratch <= budget


def test_forward_budget_grows_at_long_context_only():
    """The forward's budget is the backward's up to ~128K tokens (16 heads, d 128), then 18% of the q, k, v and out
    bytes up to 3 GiB; never below the backward's, never above 3 GiB; at 512K the forward's chunks are two whole heads
    (the backward's) where 768 MiB cut each head's queries in two."""
    MiB = 1 << 20
    for n in (4096, 8192, 16384, 65536):
        assert A.forward_scratch_budget(2, n, 16, 16, 128) == A.default_scratch_budget(2, n, 16, 16, 128)
    last = 0
    for n in (65536, 131072, 262144, 524288, 1 << 20, 1 << 22):
        b = A.forward_scratch_budget(2, n, 16, 16, 128)
        assert A.default_scratch_budget(2, n, 16, 16, 128) <= b <= 3 << 30 and b >= last
        last = b
    assert A.forward_scratch_budget(2, 262144, 16, 16, 128) == int(0.18 * 2 * 262144 * 64 * 128 * 2)
    assert A.forward_scratch_budget(2, 524288, 16, 16, 128) == int(0.18 * 2 * 524288 * 64 * 128 * 2)  # ~2.95 GB
    assert A.forward_scratch_budget(1, 1 << 22, 16, 16, 128) == 3 << 30
    fwd = A.plan_chunks(2, 524288, 16, 16, 128, 8, A.forward_scratch_budget(2, 524288, 16, 16, 128))
    assert {(c.n_heads, c.t0, c.n_q) for c in fwd} == {(2, 0, 524288)}
    assert {(c.n_heads, c.n_q) for c in A.plan_chunks(2, 524288, 16, 16, 128, 8, 768 * MiB)} == {(1, 262144)}


@pytest.mark.parametrize("dim, deterministic", [(128, False), (128, True), (64, True), (256, False)])
def test_backward_chunking_does_not_depend_on_the_forward_partials(dim, deterministic):
    """The backward plans with the forward's planner at its own bytes per pair: the same chunks as when the
    forward's partials were fp32."""
    for shape in [(2, 65536, 16, 16), (1, 4097, 8, 2), (2, 100000, 32, 4)]:
        budget = A.default_scratch_budget(*shape, dim)
        was = A.plan_chunks(*shape, dim, 8, int(budget * A.bytes_per_pair(dim, "fp32")
                                                / G.bwd_bytes_per_pair(dim, deterministic)), "fp32")
        assert G.bwd_plan(*shape, dim, 8, deterministic) == was


def test_check_args_catches_a_python_float():
    fwd = _plans(torch.bfloat16, 64, 16, True, "auto")[3]
    args = list(fwd.args)
    args[-1] = 0.1  # a Python float would arrive as the low half of a double
    with pytest.raises(TypeError, match="scale_log2"):
        check_args(A.SOURCE, fwd.kernel, tuple(args))
    assert isinstance(args[-2], np.int32)


def test_smem_and_key_tile():
    assert A.key_tile(16) == 16 and A.key_tile(32) == 32 and A.key_tile(512) == 64
    for b in C.CUDA_BLOCK_SIZES:
        assert b % A.key_tile(b) == 0
    assert A.fwd_smem_bytes(128, 512) == 64 * 128 * 2 + 4 * 64 * 128 * 2
    assert A.fwd_smem_bytes(128, 128, "resident") == 2 * 128 * 128 * 2 + 2 * 64 * 128 * 2
    # two 128-thread CTAs per SM with room for static shared memory (one 256-thread CTA at head dim 256)
    for d in C.CUDA_HEAD_DIMS:
        sizes = [A.fwd_smem_bytes(d, b, v) for b in C.CUDA_BLOCK_SIZES for v in ("auto", "streaming")]
        assert max(sizes) <= 100 * 1024 * A.fwd_threads(d) // 128, d


# ---------------------------------------------------------------------------------------------------
# chunk planning


@pytest.mark.parametrize("partial", A.PARTIALS)
@pytest.mark.parametrize(
    "batch, seqlen, heads, kv_heads, dim, top_k, budget",
    [
        (2, 1000, 4, 4, 64, 8, 1 << 30),  # everything in one chunk per batch row
        (2, 1000, 8, 2, 128, 8, 6 << 20),  # several kv groups per chunk
        (1, 4097, 8, 1, 128, 8, 1 << 20),  # query ranges split
        (2, 1, 16, 16, 64, 1, 1),  # tiny budget still makes progress
        (2, 524288, 16, 16, 128, 8, None),  # the 512K benchmark shape
    ],
)
def test_plan_chunks_cover_everything_once(batch, seqlen, heads, kv_heads, dim, top_k, budget, partial):
    if budget is None:
        budget = A.default_scratch_budget(batch, seqlen, heads, kv_heads, dim)
    chunks = A.plan_chunks(batch, seqlen, heads, kv_heads, dim, top_k, budget, partial)
    group = heads // kv_heads
    covered = {}
    for c in chunks:
        assert c.h0 % group == 0 and c.n_heads % group == 0  # whole kv groups
        assert 0 <= c.t0 and c.t0 + c.n_q <= seqlen and c.n_q >= 1
        key = (c.batch_index, c.h0, c.n_heads)
        covered.setdefault(key, []).append((c.t0, c.n_q))
        pairs = c.n_heads * c.n_q * top_k
        pair_bytes = A.bytes_per_pair(dim, partial)
        assert pairs * pair_bytes <= max(budget, group * top_k * pair_bytes)
    heads_seen = sorted({(b, h) for (b, h0, nh) in covered for h in range(h0, h0 + nh)})
    assert heads_seen == [(b, h) for b in range(batch) for h in range(heads)]
    for ranges in covered.values():
        ranges.sort()
        assert ranges[0][0] == 0 and sum(n for _, n in ranges) == seqlen
        assert all(a[0] + a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))


def test_plan_keeps_tiles_full_at_512k():
    # Each chunk's query range must be long enough that a key block's list fills tiles:
    # >= 64 * n_blocks / top_k queries per head (FlashMoBA's gap at long context).
    seqlen, block, top_k = 524288, 128, 8
    budget = A.default_scratch_budget(2, seqlen, 16, 16, 128)
    chunks = A.plan_chunks(2, seqlen, 16, 16, 128, top_k, budget)
    assert min(c.n_q for c in chunks) >= A.ROWS * (seqlen // block) / top_k
    # and the scratch stays a small fraction of FlashAttention-2's footprint (q, k, v, out)
    fa2_bytes = 4 * 2 * seqlen * 16 * 128 * 2
    assert budget <= 0.05 * fa2_bytes


@pytest.mark.parametrize("batch,seqlen,heads,kv_heads,top_k", [(1, 1 << 22, 64, 8, 64), (2, 1 << 21, 32, 32, 40)])
def test_chunks_keep_their_pair_ids_below_2_to_the_31(batch, seqlen, heads, kv_heads, top_k):
    # the kernels decode pair ids in 32-bit arithmetic; a budget of a terabyte must not make a chunk of 2^31 pairs
    chunks = A.plan_chunks(batch, seqlen, heads, kv_heads, 128, top_k, 1 << 40)
    assert max(c.n_heads * c.n_q * top_k for c in chunks) < 2**31
    covered = sum(c.n_heads * c.n_q for c in chunks)
    assert covered == batch * heads * seqlen
