"""Benchmarks: MoBA kernels against dense and sparse peers, Monte Carlo throughput, and the environment
record (versions, device, git commit) that every recorded number carries."""

from __future__ import annotations

from .environment import environment, git_commit

__all__ = ["environment", "git_commit"]
