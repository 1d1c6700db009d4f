"""The varlen benchmark's CPU-side parts: the workload, the useful-FLOP count, the report, no-GPU exit."""

from __future__ import annotations

import pytest
import torch

from mobalab.bench import varlen
from mobalab.kernels import moba_topk_varlen


def test_mixed_lengths_workload():
    lengths = varlen.MIXED_LENGTHS
    assert len(lengths) == 16 and sum(lengths) == 262144
    assert min(lengths) == 1024 and max(lengths) == 65536
    assert any(n % varlen.BLOCK for n in lengths)  # some sequences end in a partial block


def _brute_force(topk, cu, block, dim, causal):
    routing = attention = 0
    c = cu.tolist()
    for s, e in zip(c[:-1], c[1:], strict=True):
        n = e - s
        n_blocks = -(-n // block)
        for t in range(n):
            for h in range(topk.shape[1]):
                routing += 2 * dim * (t // block if causal else n_blocks)
                keys = {i for j in topk[s + t, h].tolist() if j >= 0 for i in range(j * block, min(n, (j + 1) * block))}
                if causal:
                    keys = {i for i in keys if i <= t}
                attention += 4 * dim * len(keys)
    return {"routing": routing, "attention_fwd": attention}


@pytest.mark.parametrize("causal", [True, False])
def test_useful_flops_counts_attended_keys(causal):
    g = torch.Generator().manual_seed(int(causal))
    lengths = (11, 0, 3, 17)
    cu = torch.tensor([0, 11, 11, 14, 31], dtype=torch.int32)
    q, k = torch.randn(31, 2, 4, generator=g), torch.randn(31, 1, 4, generator=g)
    topk = moba_topk_varlen(q, k, cu, max(lengths), 4, 2, causal=causal)
    assert varlen.useful_flops(topk, cu, 4, 4, causal) == _brute_force(topk, cu, 4, 4, causal)


def test_markdown_report():
    kernels = [dict(run="varlen, mixed lengths", useful_tflops=1.5, vs_equal_batch=0.95)]
    model = [dict(attention="moba", seqlen=32768, step_ms=12.5)]
    text = varlen.markdown(kernels, model, {"cuda_device": "GPU", "git_commit": "abc1234"})
    assert "| run | useful_tflops | vs_equal_batch |" in text and "| varlen, mixed lengths | 1.5 | 0.95 |" in text
    assert "| moba | 32768 | 12.5 |" in text and "abc1234" in text


def test_main_without_a_gpu_says_so(capsys, monkeypatch):
    import mobalab.kernels

    monkeypatch.setattr(mobalab.kernels, "gpu_available", lambda: False)
    assert varlen.main(["--quick"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
