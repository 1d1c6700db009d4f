"""Run a function on a world of N local processes (torch.multiprocessing, spawn) within a time limit.

The parent creates a file:// rendezvous in a fresh temporary directory (nothing leaves the machine), starts N
processes, and waits at most ``timeout`` seconds; a process that raises fails the call with its traceback, a
world that does not finish in time is terminated. Each process returns a picklable value through a file.
Tests import this module as ``_world`` (their directory on sys.path) so the spawned children can import it too.

Every child writes its stderr (Python and C++ alike, so an abort inside gloo or NCCL says why) to a log file;
when a world fails, the error carries the tail of every rank's log. A child writes its result before the
group is torn down, meets the other ranks at a barrier, destroys the group and then leaves with ``os._exit``:
interpreter finalisation with the process-group machinery loaded can abort in torch's own teardown (gloo
work objects released without the GIL), which says nothing about the code under test.
"""

from __future__ import annotations

import datetime
import gc
import importlib
import os
import pickle
import sys
import tempfile
import time

import torch.multiprocessing as mp

__all__ = ["run_world"]

LOG_TAIL = 4000  # characters of each rank's log in a failure message


def _entry(rank: int, world: int, store: str, module: str, function: str, payload, out_dir: str,
           backend: str) -> None:
    log = open(os.path.join(out_dir, f"rank{rank}.log"), "w")  # noqa: SIM115 - lives as long as the process
    os.dup2(log.fileno(), 2)
    sys.stderr = log
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # N processes share a few cores
    device = None
    if backend == "nccl":  # one GPU per process, current for torch and for CuPy (the kernels launch on CuPy's)
        from mobalab.distributed._device import use_device

        device = torch.device("cuda", rank)
        use_device(rank)
    # NCCL: the first kernel call of a rank compiles CUDA modules (seconds to a minute) while its peer waits
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60 if backend == "gloo" else 240), device_id=device)
    try:
        result = getattr(importlib.import_module(module), function)(rank, world, payload)
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(result, f)
        dist.barrier()  # nobody tears the group down while another rank still talks to it
    finally:
        dist.destroy_process_group()
    gc.collect()
    sys.stdout.flush()
    log.flush()
    os._exit(0)


def _logs(tmp: str, world: int) -> str:
    parts = []
    for rank in range(world):
        path = os.path.join(tmp, f"rank{rank}.log")
        text = open(path).read()[-LOG_TAIL:] if os.path.exists(path) else "(no log)"
        parts.append(f"--- rank {rank} stderr (last {LOG_TAIL} characters) ---\n{text}")
    return "\n".join(parts)


def run_world(world: int, module: str, function: str, payload=None, timeout: float = 120.0,
              backend: str = "gloo") -> list:
    """``module.function(rank, world, payload)`` on every rank of a fresh world; the ranks' results.

    ``backend`` "gloo" (CPU) or "nccl" (rank r on GPU r).
    """
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        context = mp.start_processes(_entry, args=(world, store, module, function, payload, tmp, backend),
                                     nprocs=world, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        try:
            while not context.join(timeout=max(0.1, deadline - time.monotonic())):
                if time.monotonic() >= deadline:
                    for process in context.processes:
                        if process.is_alive():
                            process.terminate()
                    raise TimeoutError(f"{module}.{function} on {world} processes did not finish in {timeout} s")
        except Exception as exc:
            raise RuntimeError(f"{module}.{function} on {world} processes failed: {exc}\n{_logs(tmp, world)}") \
                from exc
        results = []
        for rank in range(world):
            with open(os.path.join(tmp, f"rank{rank}.pkl"), "rb") as f:
                results.append(pickle.load(f))
        return results
