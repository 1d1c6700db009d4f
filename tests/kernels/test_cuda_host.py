"""The host emulation's own checks (host_emulation/cuda_host.h), which every kernel emulation test relies on: threads
that exchange values through shared memory and shuffles get them, and a read past a stack or heap array of an
emulated thread (AddressSanitizer), a warp split between two barriers and a cp.async never waited for stop the run
with their error; a buffer handed back and forth between two warps by bar.arrive / bar.sync and added to global
memory by bulk reductions arrives whole, and a bulk reduction whose source is rewritten before its read was waited
for, one never waited for and a bar.arrive no thread waits for stop the run. Both ways of switching between emulated
threads are built: the stack swap (x86-64, the default) and setcontext + _setjmp / _longjmp (other architectures;
``-DEMU_NO_STACK_SWAP`` forces it here). The latter cannot see a stack overflow of an array that lives across a
barrier: AddressSanitizer's handling of each ``_longjmp`` unpoisons the frames of the stack it leaves, that array's
redzones included (a strict xfail below).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _emulation import NEEDS_CXX, harness_fixture  # noqa: E402

pytestmark = NEEDS_CXX

# the probe includes no kernel text: no files to write beside it
probe_swap = harness_fixture("cuda_host_probe", lambda: {}, name="probe_swap")
probe_jmp = harness_fixture("cuda_host_probe", lambda: {}, flags=("-DEMU_NO_STACK_SWAP",), name="probe_jmp")
SWITCHES = {"stack-swap": "probe_swap", "setjmp": "probe_jmp"}


def _run(request, switch: str, kernel: str) -> subprocess.CompletedProcess:
    exe = request.getfixturevalue(SWITCHES[switch])
    return subprocess.run([str(exe), kernel], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("switch", SWITCHES)
@pytest.mark.parametrize("kernel", ["exchange", "handover"])
def test_threads_exchange_through_shared_memory_and_shuffles(request, switch, kernel):
    proc = _run(request, switch, kernel)
    assert proc.returncode == 0 and proc.stdout.split() == ["ok", switch], proc.stdout + proc.stderr[-2000:]


STACK_ACROSS_A_BARRIER = pytest.mark.xfail(
    strict=True, reason="ASan's _longjmp handling unpoisons the frames of the stack it leaves")


@pytest.mark.parametrize("switch", [
    "stack-swap", pytest.param("setjmp", marks=STACK_ACROSS_A_BARRIER)])
def test_a_stack_overflow_in_a_thread_is_reported(request, switch):
    proc = _run(request, switch, "stack_overflow")
    assert proc.returncode != 0 and "AddressSanitizer: stack-buffer-overflow" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("switch", SWITCHES)
@pytest.mark.parametrize(("kernel", "report"), [
    ("heap_overflow", "AddressSanitizer: heap-buffer-overflow"),
    ("divergent_warp", "emulation error: warp operation reached by only part of a warp"),
    ("cp_async_not_waited", "emulation error: a thread ended with cp.async copies it never waited for"),
    ("bulk_source_rewritten", "emulation error: the source of a bulk reduction changed before its thread waited"),
    ("bulk_not_waited", "emulation error: a thread ended with bulk reductions it never waited for"),
    ("arrival_unmatched", "emulation error: a block ended with bar.arrive arrivals at a named barrier"),
])
def test_errors_in_a_thread_stop_the_run(request, switch, kernel, report):
    proc = _run(request, switch, kernel)
    assert proc.returncode != 0 and report in proc.stderr, proc.stderr[-2000:]
