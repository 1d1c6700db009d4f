"""The environment record every measured number carries: versions, device, git commit, time."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
from pathlib import Path

__all__ = ["environment", "git_commit", "git_modified"]


def _git(*args: str, timeout: float) -> str | None:
    """Standard output of ``git args`` in the checkout mobalab is imported from; None where git cannot tell (no git,
    not a checkout) or ``MOBALAB_COMMIT`` names the commit from outside (the copy's git metadata may be stale)."""
    if os.environ.get("MOBALAB_COMMIT"):
        return None
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=timeout,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def git_commit() -> str | None:
    """Short hash of the checkout mobalab is imported from, or None outside a git checkout.

    ``MOBALAB_COMMIT`` in the environment wins: a copy of a working tree on another machine may carry stale
    git metadata, so the GPU scripts are told the commit by the caller.
    """
    if os.environ.get("MOBALAB_COMMIT"):
        return os.environ["MOBALAB_COMMIT"]
    return (_git("rev-parse", "--short", "HEAD", timeout=5) or "").strip() or None


def git_modified() -> bool | None:
    """Whether the checkout mobalab is imported from has uncommitted changes to tracked files; None when that
    cannot be told (not a git checkout, no git, or ``MOBALAB_COMMIT`` naming the commit from outside).

    The commit alone does not reproduce a result computed from an edited working tree, so the record says so.
    """
    status = _git("status", "--porcelain", "--untracked-files=no", timeout=10)
    return None if status is None else bool(status.strip())


def _cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what :mod:`platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    """What a reader needs to trust a number: versions, commit, CPU and device, time.

    On a machine with CUDA the record also names the GPU, its multiprocessor count, the CUDA version torch
    was built with and, where installed, CuPy's version; elsewhere those fields are None.

    Examples
    --------
    >>> from mobalab.bench import environment
    >>> env = environment()
    >>> sorted(k for k in ("git_commit", "torch", "utc", "cuda_device", "cpu") if k in env)
    ['cpu', 'cuda_device', 'git_commit', 'torch', 'utc']
    """
    import numpy
    import pandas
    import scipy
    import torch

    import mobalab

    env = {
        "mobalab": mobalab.__version__,
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
        "pandas": pandas.__version__,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "cuda_device": None,
        "cuda_sms": None,
        "cuda": None,
        "cupy": None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(cuda_device=props.name, cuda_sms=props.multi_processor_count, cuda=torch.version.cuda)
        try:
            import cupy

            env["cupy"] = cupy.__version__
        except ImportError:
            pass
    return env
