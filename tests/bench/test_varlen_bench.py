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


def test_short_documents_workload():
    docs = varlen.short_documents(262144, seed=0)
    assert sum(docs) == 262144 and docs == varlen.short_documents(262144, seed=0)
    assert all(64 <= n <= 4096 for n in docs[:-1]) and 1 <= docs[-1] <= 4096 and len(docs) > 100
    assert docs != varlen.short_documents(262144, seed=1)


def test_calls_per_run_switches_grouping_off_and_back():
    from mobalab.kernels import _varlen

    before = _varlen.RUN_COST
    with varlen._calls_per_run():
        assert _varlen.RUN_COST == 0
    assert _varlen.RUN_COST == before > 0


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
    alone = varlen.markdown(kernels, [], {"cuda_device": "GPU"})  # --kernels-only: no empty model table
    assert "| varlen, mixed lengths | 1.5 | 0.95 |" in alone and "Training step" not in alone


def test_hf_only_and_kernels_only_exclude_each_other(capsys):
    with pytest.raises(SystemExit):
        varlen.main(["--hf-only", "--kernels-only"])
    assert "--hf-only and --kernels-only exclude each other" in capsys.readouterr().err


def test_main_without_a_gpu_says_so(capsys, monkeypatch):
    import mobalab.kernels

    monkeypatch.setattr(mobalab.kernels, "gpu_available", lambda: False)
    assert varlen.main(["--quick"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_parse_lengths():
    assert varlen.parse_lengths("32K,128K") == (32768, 131072)
    assert varlen.parse_lengths(" 4k , 8192") == (4096, 8192)
    for bad in ("", "32K,", "0K", "100", "32M", "-4K", "1.5K"):
        with pytest.raises(ValueError, match="multiple of 128"):
            varlen.parse_lengths(bad)
    with pytest.raises(TypeError):
        varlen.parse_lengths(32768)


def test_command_line_options(capsys, monkeypatch):
    with pytest.raises(SystemExit):
        varlen.main(["--hf-lengths", "100"])
    assert "not a token count" in capsys.readouterr().err
    import mobalab.kernels

    monkeypatch.setattr(mobalab.kernels, "gpu_available", lambda: False)
    assert varlen.main(["--hf-only", "--hf-lengths", "32K,128K"]) == 2  # parsed, then stopped for want of a GPU


def test_model_rows_report_out_of_memory_and_go_on(monkeypatch):
    pytest.importorskip("transformers")
    calls, saved = [], []

    def fake_step(config_cls, model_cls, attn, ids, seed, warmup, reps):
        calls.append((attn, ids.shape[1], warmup, reps))
        if attn == "sdpa" and ids.shape[1] == 131072:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return (100.0 if attn == "moba" else 150.0) * ids.shape[1] / 32768, 1.5

    class Props:
        total_memory = 139e9

    monkeypatch.setattr(varlen, "_model_step", fake_step)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 140e9)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a: Props())
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    rows = varlen.model_rows(True, lengths=(32768, 131072), device="cpu", on_row=lambda r: saved.append(len(r)))
    assert calls == [("moba", 32768, 1, 3), ("sdpa", 32768, 1, 3), ("moba", 131072, 1, 3), ("sdpa", 131072, 1, 3)]
    assert saved == [1, 2, 3, 4]  # saved after every row
    assert [(r["attention"], r["seqlen"], r["step_ms"]) for r in rows[:3]] == [
        ("moba", 32768, 100.0), ("sdpa", 32768, 150.0), ("moba", 131072, 400.0)]
    assert rows[0]["speedup_vs_sdpa"] == 1.5 and rows[1]["speedup_vs_sdpa"] == 1.0
    oom = rows[3]
    assert oom["note"] == "out of memory (139 GB)" and oom["step_ms"] != oom["step_ms"]  # NaN
    text = varlen.markdown([], rows, {"cuda_device": "GPU"})
    assert text.startswith("# MoBA in a transformers model") and "Forward + backward" not in text
    assert "| sdpa | 131072 | 4 | 8 | 128 | nan | nan | 140.0 | out of memory (139 GB) | 1.0 |" in text
    # the default lengths: 32K with --quick, 32K and 128K without
    calls.clear()
    varlen.model_rows(False, device="cpu")
    assert [c[1] for c in calls] == [32768, 32768, 131072, 131072] and calls[0][2:] == (2, 5)


def test_generation_rows_on_the_cpu(monkeypatch):
    """The generation table end to end on a CPU-sized model: three rows per length (MoBA with the dynamic cache,
    MoBA with MobaCache, SDPA), MobaCache's steps decoding through moba_decode, its first step's logits those of the
    dynamic cache (same model, same tokens), speedups against SDPA."""
    pytest.importorskip("transformers")
    import mobalab.kernels as K

    monkeypatch.setattr(varlen, "MODEL", dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             head_dim=16, hidden_size=64, intermediate_size=128, vocab_size=97))
    monkeypatch.setattr(varlen, "BLOCK", 8)
    monkeypatch.setattr(varlen, "TOP_K", 2)
    calls, real = [], K.moba_decode
    monkeypatch.setattr(K, "moba_decode", lambda q, *a, **kw: calls.append(q.shape[1]) or real(q, *a, **kw))
    saved = []
    rows = varlen.generation_rows((40,), steps=4, device="cpu", on_row=lambda r: saved.append(len(r)))
    assert [(r["attention"], r["cache"], r["context"]) for r in rows] == [
        ("moba", "dynamic", 40), ("moba", "MobaCache", 40), ("sdpa", "dynamic", 40)]
    assert calls == [1] * (4 * 2)  # four steps, two layers
    assert rows[0]["first_step_rel_diff"] == 0.0 and rows[1]["first_step_rel_diff"] < 1e-2
    assert rows[2]["speedup_vs_sdpa"] == 1.0 and all(r["token_ms"] > 0 for r in rows)
    for r in rows[:2]:  # SDPA's time per token over the row's
        assert r["speedup_vs_sdpa"] == round(rows[2]["token_ms"] / r["token_ms"], 2)
    assert saved[-1] == 3
    text = varlen.markdown([], [], {"cuda_device": "CPU"}, rows)
    assert "## Generation, tiny Llama, batch 1, B 8, k 2" in text and "| moba | MobaCache | 40 |" in text
