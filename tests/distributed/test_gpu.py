"""Context parallelism on GPUs: the CUDA-kernel decomposition of a ring step on one GPU, and two GPUs (NCCL)
against single-process MoBA. Run on the device machine (``pytest -m gpu``)."""

import math
import sys
from pathlib import Path

import pytest
import torch

from mobalab.distributed._local import CudaKernels, KeySums, Params, Sink, backward_pair, cuda_kernels, forward_pair
from mobalab.distributed._merge import Accumulator, GradientSum
from mobalab.kernels import reference as R

sys.path.insert(0, str(Path(__file__).parent))
import _world  # noqa: E402

PAIRS = [  # (N, B, query start, queries, key start, keys)
    (1024, 64, 0, 1024, 0, 1024),  # one segment: one causal kernel call
    (1000, 64, 40, 600, 40, 600),  # same segment with head and tail
    (1100, 64, 700, 400, 0, 700),  # keys before the queries, more keys than queries
    (1100, 64, 900, 200, 30, 640),  # keys before, starting mid-block
    (1024, 128, 0, 300, 300, 724),  # keys after the queries (non-causal only does work)
]


def _relative(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("pair", PAIRS)
def test_cuda_step_equals_reference_step(pair, causal):
    n, block, qs, n_q, ks, n_k = pair
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(n + qs + ks)
    heads, kv_heads, dim, top_k = 4, 2, 128, 4
    q = torch.randn(1, n, heads, dim, generator=g, device=dev, dtype=torch.bfloat16)
    k, v = (torch.randn(1, n, kv_heads, dim, generator=g, device=dev, dtype=torch.bfloat16) for _ in range(2))
    topk = R.moba_topk(q, k, block, top_k, causal)
    params = Params(block, top_k, causal, 1 / math.sqrt(dim))
    kernels = cuda_kernels(q, params, "auto")
    assert isinstance(kernels, CudaKernels)
    args = (q[:, qs:qs + n_q], k[:, ks:ks + n_k], v[:, ks:ks + n_k], topk[:, qs:qs + n_q], qs, ks, params)

    def combined(pieces):
        acc = Accumulator((1, n_q, heads, dim), torch.float32, dev)
        for lo, hi, o, l_ in pieces:
            acc.add(lo, hi, o, l_)
        return acc.result()

    want, got = combined(forward_pair(*args)), combined(forward_pair(*args, kernels=kernels))
    finite = want[1].isfinite()
    assert torch.equal(finite, got[1].isfinite())
    if not finite.any():
        return
    assert _relative(got[0], want[0]) < 1e-2
    assert float((got[1] - want[1])[finite].abs().max()) < 2e-2
    out, lse = R.moba_attention_given_routing(q, k, v, topk, block, causal)
    rows = slice(qs, qs + n_q)
    dout = torch.randn(1, n_q, heads, dim, generator=g, device=dev, dtype=torch.bfloat16)
    bargs = (dout, *args[:3], out[:, rows], lse[:, rows], args[3], None, qs, ks, params)

    def summed(result):
        dq = torch.zeros(1, n_q, heads, dim, device=dev)
        dk, dv = torch.zeros(1, n_k, kv_heads, dim, device=dev), torch.zeros(1, n_k, kv_heads, dim, device=dev)
        for lo, hi, piece in result[0]:
            dq[:, lo:hi] += piece
        for lo, hi, a, b in result[1]:
            dk[:, lo:hi] += a
            dv[:, lo:hi] += b
        return dq, dk, dv

    want_grads = summed(backward_pair(*bargs))
    for a, b in zip(summed(backward_pair(*bargs, kernels=kernels)), want_grads, strict=True):
        assert _relative(a, b) < 2e-2

    # the kernels writing in place: the merge into an fp32 accumulator, the backward into fp32 sums (rows at an
    # offset in longer buffers, as a shard's segments sit in the shard); NaN where nothing may be left unwritten
    acc = Accumulator((1, n_q + 64, heads, dim), torch.float32, dev)
    acc.out.fill_(math.nan)
    acc.lse.fill_(math.nan)
    assert forward_pair(*args, kernels=kernels, acc=acc, row0=64) is None
    in_place = acc.result()
    assert torch.equal(in_place[1][:, 64:].isfinite(), want[1].isfinite())
    assert _relative(in_place[0][:, 64:], want[0]) < 1e-2
    assert float((in_place[1][:, 64:] - want[1])[finite].abs().max()) < 2e-2
    dq_sum = GradientSum((1, n_q + 64, heads, dim), torch.float32, dev)
    kv = KeySums((1, n_k + 64, kv_heads, dim), torch.float32, dev)
    for sum_ in (dq_sum, *kv.ensure()):
        sum_.value.fill_(math.nan)
    assert backward_pair(*bargs, kernels=kernels, sink=Sink(dq_sum, 64, kv, 64)) is None
    dk_sum, dv_sum = kv.result()
    for a, b in zip((dq_sum.result()[:, 64:], dk_sum[:, 64:], dv_sum[:, 64:]), want_grads, strict=True):
        assert torch.isfinite(a).all()
        assert _relative(a, b) < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("start, top_k", [(0, 8), (4096, 8), (3000, 8), (1000, 1), (2500, 17)])
def test_kernel_router_equals_single_device_routers(start, top_k, causal):
    """The fused top-k kernel at the shard's query offset against the single-device reference and CUDA routers
    at global positions (agreement: all but near-ties)."""
    from mobalab.distributed._routing import kernel_lists, route_segment
    from mobalab.kernels import moba_topk

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(start + top_k)
    q = torch.randn(1, 8192, 8, 128, generator=g, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, 8192, 2, 128, generator=g, device=dev, dtype=torch.bfloat16)
    centroids = R.moba_centroids(k, 64)
    got = route_segment(q[:, start:], start, centroids, 64, top_k, causal, kernel_lists)
    for want in (R.moba_topk(q, k, 64, top_k, causal), moba_topk(q, k, 64, top_k, causal)):
        same = (got.sort(-1).values == want[:, start:].sort(-1).values).all(-1).double().mean()
        assert same >= 0.99, f"routing agreement {float(same)}"
    if causal:  # slot 0 is the own block, exactly
        own = torch.arange(start, 8192, device=dev) // 64
        assert torch.equal(got[0, :, :, 0].long(), own.view(-1, 1).expand(-1, 8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("payload", [
    dict(lengths=(1000, 1000), block_size=64, top_k=4, heads=4, kv_heads=2, head_dim=128),
    dict(lengths=(1500, 700), block_size=128, top_k=3, causal=False, heads=4, kv_heads=4, head_dim=64),
    dict(lengths=(900, 1100), block_size=64, top_k=4, layout="zigzag", heads=4, kv_heads=1, head_dim=128),
], ids=["contiguous-causal-gqa", "unequal-noncausal", "zigzag-causal-mqa"])
def test_two_gpus_equal_single_process(payload):
    results = _world.run_world(2, "_cases", "gpu_case", payload, timeout=300, backend="nccl")
    for rank, got in enumerate(results):
        assert got["routing_agreement"] >= 0.99, f"rank {rank}: routing agreement {got['routing_agreement']}"
        for what in ("out", "dq", "dk", "dv"):
            assert got[what] < 2e-2, f"rank {rank}: {what} relative error {got[what]}"
