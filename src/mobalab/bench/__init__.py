"""Benchmarks: MoBA kernels against dense and sparse peers, Monte Carlo throughput, the environment record
(versions, device, git commit) that every recorded number carries, and the results recorded on reference
machines (package data in ``mobalab/bench/recorded/``).

Run a benchmark as a module: ``python -m mobalab.bench.monte_carlo`` (Monte Carlo throughput) or
``mobalab bench`` (the attention kernels on a GPU).
"""

from __future__ import annotations

from ._recorded import find_csv, recorded_dir, recorded_file, recorded_files
from .environment import environment, git_commit

__all__ = ["environment", "find_csv", "git_commit", "recorded_dir", "recorded_file", "recorded_files"]
