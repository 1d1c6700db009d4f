"""Experiments: each sweeps a design space, runs the legs it needs and returns a tidy DataFrame.

Every experiment module provides a frozen ``Config`` dataclass (with ``Config.quick()``),
``run(config, progress=False) -> DataFrame``, ``plot(df) -> Figure`` and ``summary(df) -> DataFrame``,
and may provide ``plan(config) -> str`` (what a run will do and on which device, said before it starts)
and ``caption(df) -> str`` (where the numbers come from, printed above the summary).
``mobalab run <name>`` runs one from the command line and writes its result folder; :func:`read_run` reads
such a folder back, checked against the manifest in its JSON.
"""

from __future__ import annotations

from importlib import import_module

from ._output import read_run

__all__ = ["get", "names", "read_run"]

#: experiment name (as typed on the command line) -> module path
REGISTRY: dict[str, str] = {
    "snr-vs-accuracy": "mobalab.experiments.snr_vs_accuracy",
    "needle-retrieval": "mobalab.experiments.needle_retrieval",
    "kernel-speed": "mobalab.experiments.kernel_speed",
    "block-size": "mobalab.experiments.block_size",
    "key-conv": "mobalab.experiments.key_conv",
    "rope": "mobalab.experiments.rope",
    "decode-cost": "mobalab.experiments.decode_cost",
    "trained-routing": "mobalab.experiments.trained_routing",
}


def names() -> list[str]:
    """The registered experiment names, sorted.

    Examples
    --------
    >>> from mobalab import experiments
    >>> experiments.names()  # doctest: +NORMALIZE_WHITESPACE
    ['block-size', 'decode-cost', 'kernel-speed', 'key-conv', 'needle-retrieval', 'rope', 'snr-vs-accuracy',
     'trained-routing']
    """
    return sorted(REGISTRY)


def get(name: str):
    """The experiment module registered as ``name``; ValueError listing the names for an unknown one.

    Examples
    --------
    >>> from mobalab import experiments
    >>> experiments.get("key-conv").NAME
    'key-conv'
    """
    try:
        return import_module(REGISTRY[name])
    except KeyError:
        raise ValueError(f"unknown experiment {name!r}; available: {', '.join(names())}") from None
