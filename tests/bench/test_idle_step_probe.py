"""scripts/idle_step_probe.py on the CPU: the clock samples assigned to the modes' step windows, and its table."""

SCRIPT_NAME = "idle_step_probe"  # the conftest's `script` fixture loads it


def test_clock_stats_take_the_samples_inside_each_modes_windows(script):
    samples = [(0.5, "t, 1000, 100"), (1.5, "t, 1980, 600"), (2.5, "t, 1950, 610"), (3.5, "t, [N/A], 5"),
               (4.5, "t, 1965, 605"), (9.0, "t, 1, 1")]
    windows = [("idle", 1.0, 2.0), ("ahead", 2.0, 3.0), ("idle", 4.0, 5.0), ("cooled", 3.0, 4.0)]
    stats = script.clock_stats(samples, windows)
    assert stats["idle"] == (1972.5, 1965.0, 1980.0, 602.5, 2)
    assert stats["ahead"] == (1950.0, 1950.0, 1950.0, 610.0, 1)
    assert "cooled" not in stats  # its one sample is not a number


def test_table_has_a_row_per_mode_with_medians(script):
    text = script.table(524288, {"idle": [3.0, 1.0, 2.0], "ahead": [1.5]}, {"idle": (1980.0, 1965.0, 1980.0, 603.0, 9)})
    rows = [line for line in text.splitlines() if line.startswith("| idle") or line.startswith("| ahead")]
    assert rows[0].startswith("| idle | 2.00 | 3.00, 1.00, 2.00 | 1980 (1965-1980) | 603 | 9 |")
    assert rows[1].startswith("| ahead | 1.50 | 1.50 | - | - | 0 |")
