"""scripts/tree_ab.py on the CPU: the refusal of a path that is not a src directory, and the table of two arms
timed in alternating processes (the processes replaced by canned rows)."""

import pytest

SCRIPT_NAME = "tree_ab"  # the conftest's `script` fixture loads it


def test_refuses_a_path_without_a_package(script, tmp_path):
    with pytest.raises(SystemExit):
        script.main([str(tmp_path)])


def test_alternates_the_arms_and_tabulates_medians(script, tmp_path, monkeypatch, capsys):
    (tmp_path / "mobalab").mkdir()
    order = []

    def run_arm(src, points, reps):
        arm = "this" if src == script.HERE else "base"
        order.append(arm)
        ms = {"base": 2.0, "this": 1.6}[arm] + 0.01 * len(order)
        return {p: {"point": p, "idle": ms, "queued": ms / 2, "fwd": ms / 4, "attn": ms / 8} for p in points}

    monkeypatch.setattr(script, "_run_arm", run_arm)
    assert script.main([str(tmp_path), "--points", "8K", "--rounds", "3"]) == 0
    assert order == ["base", "this", "this", "base", "base", "this"]
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 8K")]
    assert [line.split("|")[2].strip() for line in lines] == ["idle", "queued", "fwd", "attn"]
    base, this = (float(lines[0].split("|")[i]) for i in (3, 4))
    assert base == pytest.approx(2.04) and this == pytest.approx(1.63)  # medians of 2.01, 2.04, 2.05 / 1.62, 1.63, 1.66
    assert lines[0].split("|")[6].strip() == "2.010-2.050" and lines[0].split("|")[7].strip() == "1.620-1.660"
