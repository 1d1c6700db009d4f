"""Experiments: each sweeps a design space, runs the legs it needs and returns a tidy DataFrame.

Every experiment module provides a frozen ``Config`` dataclass (with ``Config.quick()``),
``run(config, progress=False) -> DataFrame``, ``plot(df) -> Figure`` and ``summary(df) -> DataFrame``.
``mobalab run <name>`` runs one from the command line.
"""

from __future__ import annotations

from importlib import import_module

__all__ = ["REGISTRY", "get", "names"]

#: experiment name (as typed on the command line) -> module path
REGISTRY: dict[str, str] = {
    "snr-vs-accuracy": "mobalab.experiments.snr_vs_accuracy",
    "needle-retrieval": "mobalab.experiments.needle_retrieval",
    "kernel-speed": "mobalab.experiments.kernel_speed",
    "block-size": "mobalab.experiments.block_size",
    "key-conv": "mobalab.experiments.key_conv",
    "trained-routing": "mobalab.experiments.trained_routing",
}


def names() -> list[str]:
    return sorted(REGISTRY)


def get(name: str):
    """The experiment module registered as ``name``."""
    try:
        return import_module(REGISTRY[name])
    except KeyError:
        raise ValueError(f"unknown experiment {name!r}; available: {', '.join(names())}") from None
