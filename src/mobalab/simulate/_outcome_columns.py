"""The outcome columns every Monte Carlo row carries: hits, trials, estimate and its 95% Wilson interval."""

from __future__ import annotations

from mobalab.stats import wilson_interval

__all__ = ["outcome_columns"]


def outcome_columns(hits: int, trials: int) -> dict:
    """``hits``, ``trials``, ``estimate = hits / trials`` and the 95% Wilson ``ci_low``, ``ci_high``."""
    lo, hi = wilson_interval(hits, trials, 0.95)
    return {
        "hits": int(hits),
        "trials": int(trials),
        "estimate": hits / trials,
        "ci_low": float(lo),
        "ci_high": float(hi),
    }
