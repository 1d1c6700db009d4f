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

    def run_arm(src, reps, tiles):
        assert tiles is None
        arm = "this" if src == script.HERE else "base"
        order.append(arm)
        us = {"base": 100.0, "this": 80.0}[arm] + len(order)
        launches = {"count": us / 4, "scan": us / 4, "scatter": us / 2}
        return [{"point": "64K", "keys": 2049, "equal": True, "launches": launches, "total": us,
                 "scatter": us / 2}]

    monkeypatch.setattr(script, "_run_arm", run_arm)
    assert script.main([str(tmp_path), "--rounds", "3"]) == 0
    assert order == ["base", "this", "this", "base", "base", "this"]
    out = capsys.readouterr().out.splitlines()
    lines = [line.split() for line in out if line.startswith("64K")]
    assert [line[2] for line in lines] == ["scatter", "total"]
    total = lines[-1]
    # medians of 101, 104, 105 and 82, 83, 86
    assert float(total[3]) == pytest.approx(104.0) and float(total[4]) == pytest.approx(83.0)
    assert float(total[5]) == pytest.approx(104.0 / 83.0, abs=0.01) and total[-1] == "True"
    assert any(line.startswith("this: 64K: count 20.8, scan 20.8, scatter 41.5") for line in out)


def test_compares_two_sorts_of_this_tree(script, monkeypatch, capsys):
    seen = []

    def run_arm(src, reps, tiles):
        assert src == script.HERE
        seen.append(tiles)
        us = {"auto": 120.0, "radix": 90.0}[tiles]
        return [{"point": "512K-lo", "keys": 4097, "equal": True, "launches": {"scatter": us}, "total": us,
                 "scatter": us}]

    monkeypatch.setattr(script, "_run_arm", run_arm)
    assert script.main(["--tiles-ab", "auto,radix", "--rounds", "2"]) == 0
    assert seen == ["auto", "radix", "radix", "auto"]
    total = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("512K-lo")][-1]
    assert total[2:6] == ["total", "120.0", "90.0", "1.33"]
    with pytest.raises(SystemExit):
        script.main(["--tiles-ab", "auto"])


def test_every_arm_passes_the_radix_scratch_its_tree_has(script):
    from types import SimpleNamespace

    scratch = SimpleNamespace(radix="radix scratch")
    assert script._sort_kwargs(scratch, None) == {"radix": "radix scratch"}
    assert script._sort_kwargs(scratch, "narrow") == {"radix": "radix scratch", "tiles": "narrow"}
    assert script._sort_kwargs(SimpleNamespace(), None) == {}
