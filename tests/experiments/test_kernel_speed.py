import csv
import json
import math

import numpy as np
import pandas as pd
import pytest

from mobalab.experiments import kernel_speed as exp

K = 1024


def _write_bench(folder, device="NVIDIA H200 (synthetic fixture)"):
    """A small CSV shaped like `python -m mobalab.kernels.bench` output, numbers made up but consistent."""
    rows = []
    for d in (64, 128):
        for n in (8 * K, 32 * K, 128 * K):
            fa2 = 1e-9 * n * n * d / 8
            rows.append(dict(workload="random", seqlen=n, head_dim=d, block=128, top_k=8, variant="resident",
                             routing="cuda", mobalab_ms=fa2 / (n / (4 * K)), routing_ms=0.1 * fa2,
                             attention_ms=0.5 * fa2,
                             routing_share=0.3, fa2_ms=fa2, cudnn_ms=0.8 * fa2, useful_tflops=20.0 + n / K,
                             attention_tflops=40.0, routing_tflops=100.0, mobalab_peak_gb=0.1 * n / K,
                             fa2_peak_gb=0.12 * n / K, cudnn_peak_gb="" if n > 64 * K else 0.13 * n / K,
                             fa2_tflops=300.0, cudnn_tflops=400.0, batch=2, heads=16, causal=True, dtype="bf16",
                             reps=10))
    base = rows[-2]
    for b in (32, 64, 256):
        r = dict(base)
        r.update(block=b, mobalab_ms=r["mobalab_ms"] * b / 128, variant="streaming" if b == 256 else "resident")
        rows.append(r)
    rows.append(dict(rows[0], fa2_ms="", cudnn_ms=""))  # a failed dense baseline: blank cells
    rows[-1]["seqlen"] = 4 * K
    path = folder / "bench.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (folder / "bench_env.json").write_text(json.dumps({"device": device, "date": "2026-01-01 00:00 UTC"}))
    return path, rows


@pytest.fixture()
def bench(tmp_path):
    return _write_bench(tmp_path)


def test_schema_rows_and_speedups(bench):
    path, rows = bench
    df = exp.run(exp.Config(bench_csv=str(path)))
    assert len(df) == 3 * len(rows)
    assert set(df["method"]) == {"mobalab", "fa2", "cudnn"}
    assert {"experiment", "source", "device", "seqlen", "head_dim", "block", "latency_ms", "tflops", "peak_gb",
            "speedup_vs_fa2", "speedup_vs_cudnn"} <= set(df.columns)
    assert df["device"].str.contains("H200").all()
    assert set(df.loc[df["method"] == "mobalab", "backend"]) == {"cuda-kernel"}
    mob = df[df["method"] == "mobalab"].reset_index(drop=True)
    raw = pd.read_csv(path)
    np.testing.assert_allclose(mob["speedup_vs_fa2"], raw["fa2_ms"] / raw["mobalab_ms"])
    fa2 = df[df["method"] == "fa2"]["speedup_vs_fa2"].dropna()
    np.testing.assert_allclose(fa2, 1.0)
    assert math.isnan(mob["speedup_vs_fa2"].iloc[-1])  # blank dense cells stay missing, not zero
    s = exp.summary(df)
    assert len(s) == len(rows) and {"mobalab_ms", "fa2_ms", "cudnn_ms", "x_fa2", "useful_tflops"} <= set(s.columns)


def test_plot_labelled(bench):
    df = exp.run(exp.Config(bench_csv=str(bench[0])))
    fig = exp.plot(df)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == 6
    for ax in visible:
        assert ax.get_xlabel() and ax.get_ylabel() and ax.has_data()
        assert "(" in ax.get_ylabel() or "%" in ax.get_ylabel()  # units
    assert "H200" in fig._suptitle.get_text()


def test_missing_columns_and_missing_csv(tmp_path, monkeypatch):
    bad = tmp_path / "x.csv"
    pd.DataFrame({"seqlen": [1], "mobalab_ms": [1.0]}).to_csv(bad, index=False)
    with pytest.raises(ValueError, match="lacks the columns"):
        exp.run(exp.Config(bench_csv=str(bad)))
    with pytest.raises(FileNotFoundError, match="mobalab.kernels.bench"):
        exp.run(exp.Config(bench_csv=str(tmp_path / "nope.csv")))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(exp.ENV_VAR, raising=False)
    monkeypatch.setattr("mobalab.kernels.gpu_available", lambda: False)
    assert exp.Config().bench_csv is None
    with pytest.raises(FileNotFoundError, match="python -m mobalab.kernels.bench --out runs/bench"):
        exp.run(exp.Config())


def test_default_csv_is_env_var_then_newest_under_runs_bench(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(exp.ENV_VAR, raising=False)
    (tmp_path / "runs" / "bench" / "a").mkdir(parents=True)
    old, _ = _write_bench(tmp_path / "runs" / "bench" / "a")
    new = tmp_path / "runs" / "bench" / "b.csv"
    new.write_text(old.read_text())
    import os

    os.utime(old, (1, 1))
    assert exp.Config().bench_csv == os.path.join("runs", "bench", "b.csv")
    monkeypatch.setenv(exp.ENV_VAR, str(old))
    assert exp.Config().bench_csv == str(old)


def test_required_columns_match_the_benchmark():
    bench = pytest.importorskip("mobalab.bench.attention")
    assert set(exp.REQUIRED_COLUMNS) <= set(bench.COLUMNS)


def test_cli_reads_env_csv(bench, tmp_path, monkeypatch):
    from mobalab.cli import main

    monkeypatch.setenv(exp.ENV_VAR, str(bench[0]))
    out = tmp_path / "out"
    assert main(["run", "kernel-speed", "--quick", "--out", str(out), "--no-progress"]) == 0
    for suffix in ("csv", "json", "png"):
        assert (out / f"kernel-speed.{suffix}").stat().st_size > 0
    meta = json.loads((out / "kernel-speed.json").read_text())
    assert meta["config"]["bench_csv"] == str(bench[0])
