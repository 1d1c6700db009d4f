"""Module-scoped fixtures whose value is slow to make (a compiler run: an emulation harness, the nvcc checks),
started in the background as soon as the tests are collected.

Run in one process, the tests take one core and CI has two; a compiler run of 5-80 s on the other core, made before
the tests that need it come up, takes it off the run's critical path. Under pytest-xdist (the README's command runs a
worker per core) every core runs tests, so a worker queues nothing at collection (:func:`start`) and a fixture is
made when its module's first test asks for it. A test module declares such a fixture with
:func:`background_fixture` (``name = background_fixture("name", make)``, ``make`` a function of no arguments);
``conftest.py`` calls :func:`start` with the collected items, which queues every declared fixture of their
modules on one background thread, in the order the modules come; the fixture then waits for its value if its
making has begun (a failure or a skip inside ``make`` is raised in the fixture, as if it had run there), and makes
it itself if it has not (still queued behind others, or a module imported after collection).

Test modules are imported with ``--import-mode=importlib``: they put this folder on ``sys.path`` and import
``_background`` (or ``_emulation``, which uses it), as ``conftest.py`` does, so all share this module's registry.
"""

from __future__ import annotations

import atexit
import os
import queue
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import pytest

_ROOT: list[Path] = []  # the session's scratch folder, removed at exit


class Worker:
    """Declared fixtures, the futures of those queued, and one daemon thread that makes them in queue order. The
    session has one (:data:`SESSION`); the tests of this mechanism make their own, so that they do not wait behind
    the session's compiler runs."""

    def __init__(self) -> None:
        # (test module file, fixture name) -> make: every declared fixture, in import order
        self.declared: dict[tuple[str, str], Callable[[], object]] = {}
        self.started: dict[tuple[str, str], Future] = {}
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def start(self, items) -> None:
        """Queue every declared fixture of the modules of the test items ``items`` that will run (no skip mark), in
        the order of the items, unless queued already."""
        order = list(dict.fromkeys(getattr(item.module, "__file__", "") for item in items
                                   if getattr(item, "module", None) is not None and not _skipped(item)))
        todo = [key for f in order for key in self.declared if key[0] == f and key not in self.started]
        if not todo:
            return
        if self._thread is None:  # a daemon thread: a session that ends early does not wait for a build nobody needs
            self._thread = threading.Thread(target=self._work, name="test-background", daemon=True)
            self._thread.start()
        for key in todo:
            self.started[key] = Future()
            self._queue.put((self.started[key], self.declared[key]))

    def _work(self) -> None:
        while True:
            future, make = self._queue.get()
            if future is None:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(make())
            except BaseException as exc:  # noqa: BLE001  (pytest's skip is a BaseException: raised in the fixture)
                future.set_exception(exc)

    def stop(self) -> None:
        """Drop what has not started; what is running is abandoned with the daemon thread."""
        for future in self.started.values():
            future.cancel()
        if self._thread is not None:
            self._queue.put((None, None))


SESSION = Worker()  # the test session's: conftest.py starts it once the tests are collected


def scratch_dir(prefix: str) -> Path:
    """A new folder for a fixture's files (``tmp_path_factory`` is not at hand in a background thread), inside one
    temporary folder that is removed when the session's process exits."""
    if not _ROOT:
        _ROOT.append(Path(tempfile.mkdtemp(prefix="mobalab-tests-")))
        atexit.register(shutil.rmtree, _ROOT[0], True)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir=_ROOT[0]))


def background_fixture(name: str, make: Callable[[], object], *, depth: int = 1):
    """The module-scoped fixture ``name`` whose value is ``make()``, made in the background once the tests are
    collected. ``depth``: stack frames between the calling test module and this call (a helper that wraps this
    one passes 2)."""
    module_file = sys._getframe(depth).f_globals.get("__file__", "")
    SESSION.declared[(module_file, name)] = make

    @pytest.fixture(scope="module", name=name)
    def _fixture(request):
        started = SESSION.started.get((getattr(request.module, "__file__", ""), name))
        if started is None or started.cancel():  # not queued, or still waiting behind others: make it here
            return make()
        return started.result()

    return _fixture


def start(items) -> None:
    """Queue, on the session's background thread, every declared fixture of the modules of the test items ``items``
    that will run (no skip mark), in the order of the items, unless queued already. Nothing in a pytest-xdist worker:
    it collects every test but runs only the files it is given, on cores the other workers' tests use, so there a
    fixture is made when its module's first test asks for it."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        SESSION.start(items)


def _skipped(item) -> bool:
    if item.get_closest_marker("skip") is not None:
        return True
    return any(m.args and m.args[0] is True for m in item.iter_markers("skipif"))


def stop() -> None:
    """Drop what has not started (the session is over); what is running is abandoned with the daemon thread."""
    SESSION.stop()
