"""scripts/pairs_ab.py on the CPU: the refusal of a path that is not a src directory, and the table of two arms
timed in alternating processes (the processes replaced by canned rows)."""

import pytest

SCRIPT_NAME = "pairs_ab"  # the conftest's `script` fixture loads it


def test_refuses_a_path_without_a_package(script, tmp_path):
    with pytest.raises(SystemExit):
        script.main([str(tmp_path)])


def test_alternates_the_arms_and_tabulates_medians(script, tmp_path, monkeypatch, capsys):
    (tmp_path / "mobalab").mkdir()
    order = []

    def run_arm(src, reps):
        arm = "this" if src == script.HERE else "base"
        order.append(arm)
        us = {"base": 100.0, "this": 80.0}[arm] + len(order)
        return [{"point": "64K", "keys": 2049, "tiles": 512, "equal": True, "count": us / 4, "scan": us / 4,
                 "scatter": us / 2}]

    monkeypatch.setattr(script, "_run_arm", run_arm)
    assert script.main([str(tmp_path), "--rounds", "3"]) == 0
    assert order == ["base", "this", "this", "base", "base", "this"]
    lines = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("64K")]
    assert [line[3] for line in lines] == ["count", "scan", "scatter", "total"]
    total = lines[-1]
    # medians of 101, 104, 105 and 82, 83, 86
    assert float(total[4]) == pytest.approx(104.0) and float(total[5]) == pytest.approx(83.0)
    assert total[-1] == "True"
