"""The background fixtures of the kernel tests (_background): made on the worker thread once queued, failures and
skips kept for the fixture, skipped items not queued."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import _background as bg  # noqa: E402


class _Item:
    def __init__(self, module_file: str, skip: bool = False):
        self.module = types.SimpleNamespace(__file__=module_file)
        self._skip = skip

    def get_closest_marker(self, name):
        return object() if (self._skip and name == "skip") else None

    def iter_markers(self, name):
        return iter(())


# These items queue behind whatever the one worker thread was given at collection (the nvcc builds of the kernel
# modules, minutes on a loaded 2-core machine), so the wait covers that backlog; it guards against a hang, not speed.
WAIT_S = 900


def _declare(module_file: str, name: str, make):
    bg._DECLARED[(module_file, name)] = make
    return (module_file, name)


def test_queued_fixtures_are_made_in_order_on_the_worker(tmp_path):
    f = str(tmp_path / "mod_a.py")
    made = []
    keys = [_declare(f, f"v{i}", lambda i=i: made.append(i) or i * 10) for i in range(3)]
    bg.start([_Item(f), _Item(f)])
    assert [bg._STARTED[k].result(timeout=WAIT_S) for k in keys] == [0, 10, 20]
    assert made == [0, 1, 2]
    bg.start([_Item(f)])  # queued once only
    assert made == [0, 1, 2]


def test_a_skip_or_failure_inside_make_is_kept_for_the_fixture(tmp_path):
    f = str(tmp_path / "mod_b.py")

    def skipping():
        pytest.skip("no compiler")

    def failing():
        raise AssertionError("nvcc failed")

    k1, k2 = _declare(f, "s", skipping), _declare(f, "x", failing)
    bg.start([_Item(f)])
    with pytest.raises(pytest.skip.Exception):
        bg._STARTED[k1].result(timeout=WAIT_S)
    with pytest.raises(AssertionError, match="nvcc failed"):
        bg._STARTED[k2].result(timeout=WAIT_S)


def test_modules_whose_items_are_all_skipped_are_not_queued(tmp_path):
    f = str(tmp_path / "mod_c.py")
    key = _declare(f, "y", lambda: 1)
    bg.start([_Item(f, skip=True)])
    assert key not in bg._STARTED
