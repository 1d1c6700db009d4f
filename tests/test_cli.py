import json

import pandas as pd

from mobalab import cli


def test_list(capsys):
    assert cli.main(["list"]) == 0
    assert "snr-vs-accuracy" in capsys.readouterr().out


def test_run_quick_writes_csv_json_png(tmp_path, capsys):
    out = tmp_path / "svsa"
    assert cli.main(["run", "snr-vs-accuracy", "--quick", "--out", str(out), "--seed", "5", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "max_abs_units" in printed and "snr-vs-accuracy" in printed
    df = pd.read_csv(out / "snr-vs-accuracy.csv")
    assert {"analytic", "score-level", "vector-level"} <= set(df["method"])
    meta = json.loads((out / "snr-vs-accuracy.json").read_text())
    assert meta["config"]["seed"] == 5 and meta["rows"] == len(df)
    assert "torch" in meta["environment"]
    png = (out / "snr-vs-accuracy.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_unknown_experiment(capsys):
    assert cli.main(["run", "no-such-thing", "--quick"]) == 2
    assert "unknown experiment" in capsys.readouterr().err


def test_bench_without_gpu_says_what_it_needs(capsys, monkeypatch):
    import mobalab.kernels as K

    monkeypatch.setattr(K, "gpu_available", lambda: False)
    assert cli.main(["bench", "--quick"]) == 2
    assert "needs an NVIDIA GPU" in capsys.readouterr().err
