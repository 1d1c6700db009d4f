import json

import pandas as pd
import pytest

from mobalab.bench import recorded_dir, recorded_file, recorded_files
from mobalab.experiments import kernel_speed


def test_recorded_results_ship_inside_the_package():
    import mobalab

    assert recorded_dir().parent.parent == __import__("pathlib").Path(mobalab.__file__).resolve().parent
    names = [p.name for p in recorded_files()]
    assert names == sorted(names) and len(names) == len(set(names)) == 28
    assert {"2026-11-22-h200-moba-forward-43ade7f.csv", "2026-11-22-h200-moba-fwdbwd-e4ca8e1.csv",
            "2026-11-22-h200-moba-fwdbwd-sweep.csv", "2026-11-22-h200-snr-vs-accuracy-full.csv",
            "2026-11-30-h200-head-dims-ce1fd61.csv", "2026-11-30-h200-rope-full.csv",
            "2026-11-30-h200-trained-routing.csv",
            "2026-11-30-h200x2-context-parallel-ce1fd61.csv", "2026-11-30-h200x2-context-parallel-7476fe2.csv",
            "2026-11-30-h200x2-context-parallel-dc47def.csv", "2026-11-30-h200-decode-ad34c42.csv",
            "2026-11-30-h200-decode-33eb501.csv", "2026-11-30-h200-decode-bc7caa8.csv",
            "2026-12-01-h200-decode-7e51062.csv", "2026-12-03-h200-decode-341af23.csv",
            "2026-12-03-h200-decode-bb72941.csv", "2026-12-03-h200-decode-a24964d.csv",
            "2026-12-03-h200-decode-b963354.csv", "2026-12-03-h200-decode-36727b2.csv"} <= set(names)


def test_pyproject_ships_the_recorded_files():
    import tomllib
    from pathlib import Path

    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    data = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-data"]["mobalab.bench"]
    shipped = {p.name for pattern in data for p in recorded_dir().parent.glob(pattern)}
    assert shipped == {p.name for p in recorded_dir().iterdir()}  # every recorded file is package data


@pytest.mark.parametrize("path", recorded_files("*moba-*.csv"), ids=lambda p: p.stem)
def test_every_recorded_benchmark_names_device_date_commit(path):
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["device"] == "NVIDIA H200" and meta["date"].startswith("2026-11-22") and meta["git_commit"]
    raw, info = kernel_speed.read_bench_csv(path)
    assert info["recorded"] and info["commit"] == meta["git_commit"] and len(raw) >= 2
    assert info["pass"] == ("forward+backward" if "fwdbwd" in path.name else "forward")


def test_recorded_file_by_name():
    assert recorded_file("2026-11-22-h200-moba-fwdbwd-sweep").suffix == ".csv"
    with pytest.raises(ValueError, match="no recorded file 'nope'.*recorded CSVs: 2026-11-22"):
        recorded_file("nope")
    with pytest.raises(ValueError, match="no folder"):
        recorded_file("../pyproject.toml")
    assert pd.read_csv(recorded_file("2026-11-22-cpu-key-conv-full.csv"))["experiment"].eq("key-conv").all()
