"""Run a function on a world of N local processes (torch.multiprocessing, spawn) within a time limit.

The parent creates a file:// rendezvous in a fresh temporary directory (nothing leaves the machine), starts N
processes, and waits at most ``timeout`` seconds; a process that raises fails the call with its traceback, a
world that does not finish in time is terminated. Each process returns a picklable value through a file.
Tests import this module as ``_world`` (their directory on sys.path) so the spawned children can import it too.
"""

from __future__ import annotations

import datetime
import importlib
import os
import pickle
import tempfile
import time

import torch.multiprocessing as mp

__all__ = ["run_world"]


def _entry(rank: int, world: int, store: str, module: str, function: str, payload, out_dir: str,
           backend: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # N processes share a few cores
    device = None
    if backend == "nccl":  # one GPU per process
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60), device_id=device)
    try:
        result = getattr(importlib.import_module(module), function)(rank, world, payload)
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)


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
        while not context.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                for process in context.processes:
                    if process.is_alive():
                        process.terminate()
                raise TimeoutError(f"{module}.{function} on {world} processes did not finish in {timeout} s")
        results = []
        for rank in range(world):
            with open(os.path.join(tmp, f"rank{rank}.pkl"), "rb") as f:
                results.append(pickle.load(f))
        return results
