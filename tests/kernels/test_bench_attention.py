"""The attention benchmark's CPU-checkable parts: entry point, FLOP counts against brute force."""

from __future__ import annotations

import math

import pytest
import torch

from mobalab.bench import attention as bench


def test_main_without_a_gpu_says_what_it_needs(capsys, monkeypatch):
    monkeypatch.setattr("mobalab.kernels.gpu_available", lambda: False)
    assert bench.main(["--quick", "--out", "unused"]) == 1
    assert "needs an NVIDIA GPU" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench.main(["--help"])
    assert capsys.readouterr().out.startswith("usage: mobalab bench")


@pytest.mark.parametrize("seqlen, block, top_k", [(37, 4, 3), (64, 8, 8), (5, 8, 2)])
@pytest.mark.parametrize("causal", [True, False])
def test_flop_counts_match_brute_force(seqlen, block, top_k, causal):
    n_blocks = math.ceil(seqlen / block)
    t = torch.arange(seqlen)
    scored = (t // block).sum().item() if causal else seqlen * n_blocks
    assert bench.routing_flops(2, seqlen, 3, 16, block, causal) == 2 * 2 * 3 * scored * 16
    if causal:  # own block up to t, plus min(own, top_k - 1) full past blocks
        keys = ((t % block) + 1 + torch.clamp(t // block, max=top_k - 1) * block).sum().item()
    else:
        keys = seqlen * min(top_k, n_blocks) * block
    assert bench.attended_keys(seqlen, block, top_k, causal) == keys
    assert bench.attention_flops(2, seqlen, 3, 16, block, top_k, causal) == 4 * 2 * 3 * keys * 16
    assert bench.dense_flops(1, seqlen, 1, 1, causal) == 4 * seqlen * seqlen // (2 if causal else 1)
    assert {"seqlen", "block", "head_dim", "mobalab_ms", "scratch_budget_bytes"} <= set(bench.COLUMNS)
