"""Writing an experiment's outputs: tidy CSV, config + environment JSON, PNG figures."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pandas as pd

from mobalab.bench.environment import environment, git_commit

__all__ = ["environment", "git_commit", "write_run"]


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
