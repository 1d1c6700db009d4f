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


# Each test has a worker of its own (bg.Worker), so nothing queues ahead of its items; the wait guards against a hang.
WAIT_S = 60


@pytest.fixture
def worker():
    w = bg.Worker()
    yield w
    w.stop()


def _declare(worker, module_file: str, name: str, make):
    worker.declared[(module_file, name)] = make
    return (module_file, name)


def test_queued_fixtures_are_made_in_order_on_the_worker(worker, tmp_path):
    f = str(tmp_path / "mod_a.py")
    made = []
    keys = [_declare(worker, f, f"v{i}", lambda i=i: made.append(i) or i * 10) for i in range(3)]
    worker.start([_Item(f), _Item(f)])
    assert [worker.started[k].result(timeout=WAIT_S) for k in keys] == [0, 10, 20]
    assert made == [0, 1, 2]
    worker.start([_Item(f)])  # queued once only
    assert made == [0, 1, 2]


def test_a_skip_or_failure_inside_make_is_kept_for_the_fixture(worker, tmp_path):
    f = str(tmp_path / "mod_b.py")

    def skipping():
        pytest.skip("no compiler")

    def failing():
        raise AssertionError("nvcc failed")

    k1, k2 = _declare(worker, f, "s", skipping), _declare(worker, f, "x", failing)
    worker.start([_Item(f)])
    with pytest.raises(pytest.skip.Exception):
        worker.started[k1].result(timeout=WAIT_S)
    with pytest.raises(AssertionError, match="nvcc failed"):
        worker.started[k2].result(timeout=WAIT_S)


def test_modules_whose_items_are_all_skipped_are_not_queued(worker, tmp_path):
    f = str(tmp_path / "mod_c.py")
    key = _declare(worker, f, "y", lambda: 1)
    worker.start([_Item(f, skip=True)])
    assert key not in worker.started


def test_background_fixture_declares_on_the_session_worker():
    """What conftest.py starts with the collected items is where background_fixture puts a module's fixtures."""
    bg.background_fixture("probe_value", lambda: 7)
    key = (__file__, "probe_value")
    try:
        assert bg.SESSION.declared[key]() == 7
    finally:
        del bg.SESSION.declared[key]
