"""Random streams for the simulators: one explicit seed (or numpy Generator) in, independent streams out.

Every simulator takes ``seed`` as either a non-negative ``int`` or a ``numpy.random.Generator``. An int
seeds a :class:`numpy.random.SeedSequence` whose spawned children feed the independent streams a
simulator needs (one per configuration row, or one for positions and one for vectors), so the same int
always reproduces the same numbers bit for bit. A Generator is spawned the same way (``Generator.spawn``)
and is advanced by doing so; its seed cannot be recorded, so the ``seed`` column then holds ``None``.
Torch streams are seeded from a numpy stream: reproducible per backend, never bitwise across backends.
"""

from __future__ import annotations

import numbers

import numpy as np

from .._validate import scalar_count

__all__ = ["spawn_generators", "seed_record", "torch_generator"]


def _check_seed(seed) -> int | None:
    """The int seed, or None for a numpy Generator."""
    if isinstance(seed, np.random.Generator):
        return None
    if isinstance(seed, numbers.Integral) and not isinstance(seed, bool | np.bool_) and seed >= 0:
        return int(seed)  # any size: SeedSequence takes arbitrarily large ints
    try:
        return scalar_count("seed", seed, 0)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{exc}; or pass a numpy.random.Generator") from None


def spawn_generators(seed, count: int) -> list[np.random.Generator]:
    r"""``count`` independent numpy Generators derived from ``seed`` (int or Generator).

    .. math:: \text{rng}_i = \mathrm{default\_rng}(c_i),\qquad
              (c_0, \dots, c_{\text{count}-1}) = \mathrm{SeedSequence}(\text{seed}).\mathrm{spawn}(\text{count})

    (a Generator ``seed`` is spawned the same way, ``seed.spawn(count)``, and advanced by it).

    Examples
    --------
    >>> import numpy as np
    >>> from mobalab import simulate
    >>> a, b = simulate.spawn_generators(0, 2)
    >>> again, _ = simulate.spawn_generators(0, 2)
    >>> print(a.integers(1000, size=3).tolist() == again.integers(1000, size=3).tolist(), a is not b)
    True True
    """
    int_seed = _check_seed(seed)
    count = scalar_count("count", count)
    if int_seed is None:
        return list(seed.spawn(count))
    return [np.random.default_rng(child) for child in np.random.SeedSequence(int_seed).spawn(count)]


def seed_record(seed):
    """What goes into the ``seed`` column: the int seed, or ``None`` when a Generator was given."""
    return _check_seed(seed)


def torch_generator(rng: np.random.Generator, device):
    """A ``torch.Generator`` on ``device`` seeded with a 63-bit integer drawn from ``rng``."""
    import torch

    gen = torch.Generator(device=device)
    gen.manual_seed(int(rng.integers(0, 2**63 - 1)))
    return gen
