"""Writing an experiment's outputs: tidy CSV, config + environment JSON, PNG figures."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import platform
import subprocess
from pathlib import Path

import pandas as pd

__all__ = ["environment", "git_commit", "write_run"]


def git_commit() -> str | None:
    """Short hash of the checkout mobalab is imported from, or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment() -> dict:
    """What a reader needs to trust a number: versions, commit, device, time."""
    import numpy
    import scipy
    import torch

    import mobalab

    env = {
        "mobalab": mobalab.__version__,
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
        "pandas": pd.__version__,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return env


def write_run(out_dir, name: str, config, data: pd.DataFrame, figures: dict) -> dict[str, Path]:
    """Write ``<name>.csv``, ``<name>.json`` (config + environment) and ``<name>[-<key>].png`` into ``out_dir``.

    ``figures`` maps a short key ("" for the main figure) to a matplotlib Figure. Returns the paths written.
    """
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / f"{name}.csv", "json": out / f"{name}.json"}
    data.to_csv(paths["csv"], index=False)
    cfg = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    meta = {"experiment": name, "config": cfg, "environment": environment(), "rows": len(data),
            "columns": list(data.columns)}
    paths["json"].write_text(json.dumps(meta, indent=2, default=str))
    for key, fig in figures.items():
        p = out / (f"{name}.png" if not key else f"{name}-{key}.png")
        fig.savefig(p, dpi=130, bbox_inches="tight")
        plt.close(fig)
        paths[f"png:{key}" if key else "png"] = p
    return paths
