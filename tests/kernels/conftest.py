"""Shared by the kernel tests: poisoned allocations, the GPU case grids, and the GPU oracle helpers.

Test modules are imported with ``--import-mode=importlib`` and cannot import this file, so the grids reach
tests through ``pytest_generate_tests`` (a test asking for ``attention_case`` or ``backward_case`` runs once
per case, with the ids below) and the helpers through fixtures.

The error criterion (FlashAttention's): a kernel's error against the fp32 computation from the same
bf16/fp16 inputs may be at most ``factor`` times the error of the same computation done as plain torch
does it in the input dtype, plus a small floor (:meth:`GpuOracle.assert_within_torch_error`).
"""

from __future__ import annotations

import contextlib
import math
import sys
from pathlib import Path

import pytest
import torch

from mobalab.kernels import _contract as C
from mobalab.kernels.reference import moba_attention_given_routing, moba_topk

sys.path.insert(0, str(Path(__file__).parent))
import _background  # noqa: E402  (the test modules import it the same way: one registry)


def pytest_collection_finish(session):
    """Start the collected modules' slow fixtures (compiler runs) in the background while the tests run."""
    _background.start(session.items)


def pytest_sessionfinish(session, exitstatus):
    _background.stop()


@pytest.fixture
def poisoned_empty(monkeypatch):
    """``with poisoned_empty():`` makes torch.empty / empty_like return NaN (floats) or 2**30 (int32/64),
    so any output or scratch element a kernel fails to write shows up in the comparison."""
    real_empty, real_like = torch.empty, torch.empty_like

    def fill(t):
        if t.is_floating_point():
            return t.fill_(float("nan"))
        if t.dtype in (torch.int32, torch.int64):
            return t.fill_(2**30)
        return t

    @contextlib.contextmanager
    def ctx():
        with monkeypatch.context() as m:
            m.setattr(torch, "empty", lambda *a, **kw: fill(real_empty(*a, **kw)))
            m.setattr(torch, "empty_like", lambda *a, **kw: fill(real_like(*a, **kw)))
            yield

    return ctx


@pytest.fixture(params=["eager", "ops"])
def varlen_entry(request, monkeypatch):
    """Both entries of a ``moba_attention_varlen`` call: the eager autograd Function and the custom ops (what
    ``torch.compile`` traces)."""
    from mobalab.kernels import _varlen

    monkeypatch.setattr(_varlen, "EAGER_FUNCTION", request.param == "eager")
    return request.param


# ---------------------------------------------------------------------------------------------------
# the GPU case grids: every head dim, block size, dtype; causal and not; GQA 1/4/8; awkward seqlens;
# top_k 1..64 (forward and backward share the rotation; the backward adds deterministic)

GQA = {1: (2, 2), 4: (4, 1), 8: (8, 1)}  # ratio -> (heads, kv_heads)


def _grid(backward: bool) -> list[dict]:
    cases = []
    i = 0
    for block in C.CUDA_BLOCK_SIZES:
        for dim in C.CUDA_HEAD_DIMS:
            for n in ([block - 1, block + 1, 4097] if i % 2 == 0 else [block, 1000, 4097]):
                case = dict(dtype=(torch.bfloat16, torch.float16)[i % 2], dim=dim, block=block,
                            causal=(i % 4) < 2, ratio=(1, 4, 8)[i % 3], seqlen=n, top_k=(1, 2, 8, 64)[(i // 2) % 4],
                            batch=2 if n < 2000 else 1)
                if backward:
                    case["deterministic"] = (i % 5) in (1, 3)
                cases.append(case)
                i += 1
    # seqlen 1, both modes and head dims
    for dim in C.CUDA_HEAD_DIMS:
        for causal in (True, False):
            case = dict(dtype=torch.bfloat16, dim=dim, block=64, causal=causal, ratio=4, seqlen=1, top_k=8, batch=3)
            if backward:
                case["deterministic"] = causal
            cases.append(case)
    # k >= n (dense)
    dense = [dict(dtype=torch.bfloat16, dim=128, block=128, causal=True, ratio=1, seqlen=300, top_k=8, batch=2),
             dict(dtype=torch.float16, dim=64, block=128, causal=False, ratio=4, seqlen=300, top_k=8, batch=2)]
    if backward:
        dense[0]["deterministic"], dense[1]["deterministic"] = False, True
        return cases + dense
    # long context (forward only)
    return cases + dense + [
        dict(dtype=torch.bfloat16, dim=128, block=128, causal=True, ratio=4, seqlen=65536, top_k=8, batch=1),
        dict(dtype=torch.float16, dim=64, block=32, causal=False, ratio=1, seqlen=65536, top_k=8, batch=1),
        dict(dtype=torch.bfloat16, dim=64, block=16, causal=True, ratio=8, seqlen=65536, top_k=64, batch=1),
    ]


def case_id(c: dict) -> str:
    dt = "bf16" if c["dtype"] == torch.bfloat16 else "f16"
    mode = "causal" if c["causal"] else "full"
    det = "-det" if c.get("deterministic") else ""
    return f"{dt}-d{c['dim']}-B{c['block']}-{mode}-g{c['ratio']}-N{c['seqlen']}-k{c['top_k']}-b{c['batch']}{det}"


ATTENTION_CASES = _grid(backward=False)
BACKWARD_CASES = _grid(backward=True)


def pytest_generate_tests(metafunc):
    for name, cases in (("attention_case", ATTENTION_CASES), ("backward_case", BACKWARD_CASES)):
        if name in metafunc.fixturenames:
            metafunc.parametrize(name, cases, ids=[case_id(c) for c in cases])


@pytest.fixture
def attention_grid() -> list[dict]:
    return ATTENTION_CASES


@pytest.fixture
def backward_grid() -> list[dict]:
    return BACKWARD_CASES


# ---------------------------------------------------------------------------------------------------
# GPU oracle helpers


class GpuOracle:
    """Inputs, reference routing, the fp32 oracle, the torch low-precision computations and the criterion."""

    gqa = GQA
    case_id = staticmethod(case_id)
    FORWARD_FLOOR = 1e-4
    SAMPLE_ABOVE = 20000  # longer sequences are checked on a sample of query positions (all heads, all batches)

    @staticmethod
    def inputs(batch, seqlen, heads, kv_heads, dim, dtype, seed, dout=False):
        """q, k, v (and, with ``dout``, an upstream gradient like q): standard normal, rounded to ``dtype``."""
        g = torch.Generator(device="cuda").manual_seed(seed)

        def mk(h):
            return torch.randn(batch, seqlen, h, dim, device="cuda", dtype=torch.float32, generator=g).to(dtype)

        out = (mk(heads), mk(kv_heads), mk(kv_heads))
        return out + (mk(heads),) if dout else out

    @staticmethod
    def routing(q, k, block, top_k, causal):
        """The reference router's selection, computed once and given to kernel and oracles alike."""
        return moba_topk(q, k, block, top_k, causal=causal)

    @staticmethod
    def oracle(q, k, v, topk, block, causal, scale=None):
        """fp32 (out, lse) of the same bf16/fp16 inputs: the reference with the routing given."""
        return moba_attention_given_routing(q.float(), k.float(), v.float(), topk, block, causal=causal,
                                            softmax_scale=scale)

    @staticmethod
    def lowp_rows(q, k, v, topk, block, causal, scale, rows, max_bytes=256 << 20):
        """Output rows ``rows`` of the same computation as plain torch does it in the input dtype: scores and
        P @ V as input-dtype matmuls over the gathered selected keys, softmax in fp32, probabilities rounded
        to the input dtype. Returns fp32 (batch, len(rows), heads, d)."""
        batch, seqlen, heads, dim = q.shape
        group = heads // k.shape[2]
        scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
        device = q.device
        # Slots that are -1 everywhere (top_k > n) hold no keys: drop them.
        used = (topk >= 0).flatten(0, -2).any(0).nonzero()
        topk = topk[..., : int(used.max()) + 1] if used.numel() else topk[..., :1]
        top_k = topk.shape[-1]
        per_query = batch * heads * top_k * block * (dim * 2 + 8) * 4
        step = max(1, max_bytes // max(1, per_query))
        kv_of = (torch.arange(heads, device=device) // group).view(1, 1, heads, 1)
        b_ix = torch.arange(batch, device=device).view(batch, 1, 1, 1)
        offs = torch.arange(block, device=device)
        outs = []
        for i in range(0, rows.numel(), step):
            t = rows[i:i + step]
            sel = topk[:, t].long()  # (b, T, h, top_k)
            keys = (sel.unsqueeze(-1) * block + offs).flatten(-2)  # (b, T, h, top_k * B)
            ok = (sel >= 0).unsqueeze(-1).expand(*sel.shape, block).flatten(-2) & (keys < seqlen)
            if causal:
                ok &= keys <= t.view(1, -1, 1, 1)
            kc = keys.clamp(0, seqlen - 1)
            kg, vg = k[b_ix, kc, kv_of], v[b_ix, kc, kv_of]  # (b, T, h, L, d)
            s = (q[:, t].unsqueeze(-2) @ kg.transpose(-1, -2)).squeeze(-2).float() * scale
            s = s.masked_fill(~ok, float("-inf"))
            p = torch.exp(s - torch.logsumexp(s, dim=-1, keepdim=True))
            outs.append((p.to(q.dtype).unsqueeze(-2) @ vg).squeeze(-2).float())
        return torch.cat(outs, dim=1)

    @staticmethod
    def _routed_mask(topk, block, causal):
        """(batch, heads, N, N) bool: key s is attended by query t (from the routing, token-causal)."""
        batch, seqlen, heads, _ = topk.shape
        n_blocks = math.ceil(seqlen / block)
        chosen = torch.zeros(batch, seqlen, heads, n_blocks + 1, dtype=torch.bool, device=topk.device)
        chosen.scatter_(-1, torch.where(topk >= 0, topk, n_blocks).long(), True)  # column n_blocks: -1 slots
        keys = torch.arange(seqlen, device=topk.device)
        mask = chosen[..., keys // block]  # (b, t, h, s)
        if causal:
            mask &= (keys.view(1, -1) <= keys.view(-1, 1)).view(1, seqlen, 1, seqlen)
        return mask.permute(0, 2, 1, 3)

    @classmethod
    def lowp_grads(cls, q, k, v, dout, topk, block, causal, scale=None, dlse=None):
        """Gradients (fp32) of the computation plain torch does in the input dtype: a dense softmax masked to
        the routed tokens, scores and P @ V as input-dtype matmuls, softmax in fp32, probabilities rounded."""
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        qh, kh, vh = (x.transpose(1, 2) for x in leaves)
        group = q.shape[2] // k.shape[2]
        kh, vh = (x.repeat_interleave(group, dim=1) for x in (kh, vh))
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        s = (qh @ kh.transpose(-1, -2)).float() * scale
        s = s.masked_fill(~cls._routed_mask(topk, block, causal), float("-inf"))
        lse = torch.logsumexp(s, dim=-1)
        o = torch.exp(s - lse.unsqueeze(-1)).to(vh.dtype) @ vh
        return cls._grads(o.transpose(1, 2).float(), lse.transpose(1, 2), dout, dlse, leaves)

    @classmethod
    def oracle_grads(cls, q, k, v, dout, topk, block, causal, scale=None, dlse=None):
        """Gradients by autograd through the fp32 oracle (:meth:`oracle`) from the same inputs."""
        leaves = [x.detach().float().requires_grad_() for x in (q, k, v)]
        out, lse = moba_attention_given_routing(*leaves, topk, block, causal=causal, softmax_scale=scale)
        return cls._grads(out, lse, dout, dlse, leaves)

    @staticmethod
    def _grads(out, lse, dout, dlse, leaves):
        loss = (out * dout.float()).sum()
        if dlse is not None:
            loss = loss + (lse * dlse).sum()
        return [g.float() for g in torch.autograd.grad(loss, leaves)]

    @staticmethod
    def assert_within_torch_error(got, ref, low, *, factor, floor, label):
        """max|got - ref| <= factor * max|low - ref| + floor; returns (error, torch low-precision error)."""
        err = (got.float() - ref).abs().max().item()
        err_low = (low.float() - ref).abs().max().item()
        assert err <= factor * err_low + floor, (
            f"{label}: kernel error {err:.3e} vs torch low precision {err_low:.3e} (allowed {factor} x + {floor:.1e})")
        return err, err_low

    @classmethod
    def check_forward(cls, q, k, v, topk, block, causal, out, lse, scale=None, label=""):
        """A forward's (out, lse) with routing ``topk``: finite, out within the criterion (factor 2, floor
        ``FORWARD_FLOOR``) of the oracle, lse within 2e-3 + 1e-3 |lse|; sequences longer than ``SAMPLE_ABOVE``
        on the first and last 4 query positions and 504 random ones (all heads, all batches). Returns (error,
        torch low-precision error)."""
        seqlen = q.shape[1]
        assert out.dtype == q.dtype and out.shape == q.shape
        assert torch.isfinite(out).all(), f"{label}: non-finite output (unwritten or NaN)"
        assert torch.isfinite(lse).all(), f"{label}: non-finite lse"
        if seqlen > cls.SAMPLE_ABOVE:
            g = torch.Generator(device=q.device).manual_seed(seqlen)
            rows = torch.cat([torch.arange(4, device=q.device), torch.arange(seqlen - 4, seqlen, device=q.device),
                              torch.randint(0, seqlen, (504,), device=q.device, generator=g)])
        else:
            rows = torch.arange(seqlen, device=q.device)
        ref, ref_lse = cls.oracle(q, k, v, topk, block, causal, scale)
        ref, ref_lse = ref[:, rows], ref_lse[:, rows]
        low = cls.lowp_rows(q, k, v, topk, block, causal, scale, rows)
        errs = cls.assert_within_torch_error(out[:, rows], ref, low, factor=2, floor=cls.FORWARD_FLOOR, label=label)
        torch.testing.assert_close(lse[:, rows], ref_lse, atol=2e-3, rtol=1e-3)
        return errs


@pytest.fixture
def gpu() -> type[GpuOracle]:
    return GpuOracle


@pytest.fixture(params=["default", "runs", "pad-all"])
def varlen_grouping(request, monkeypatch):
    """How a varlen call batches its sequences: the cost model's choice, every run of one length a call of its
    own, or every causal sequence in one zero-padded batch."""
    from mobalab.kernels import _varlen

    cost = {"default": _varlen.RUN_COST, "runs": 0, "pad-all": 1 << 62}[request.param]
    monkeypatch.setattr(_varlen, "RUN_COST", cost)
    return request.param
