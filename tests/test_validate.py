"""The shared argument checks (mobalab._validate): kinds, bounds, shapes and the memory guard."""

import numpy as np
import pytest

from mobalab import _validate as v


def test_counts():
    assert v.scalar_count("n", np.int16(3)) == 3 and v.scalar_count("n", 3.0) == 3
    np.testing.assert_array_equal(v.count("n", [1, 2.0, np.int8(3)]), [1, 2, 3])
    assert v.count("n", [[1, 2]]).dtype == np.int64
    for bad, error in [
        (True, TypeError),
        ([1, True], TypeError),
        ("3", TypeError),
        (None, TypeError),
        (1 + 2j, TypeError),
        ([[1], [1, 2]], TypeError),
        (0.5, ValueError),
        (0, ValueError),
        (2.0**60, ValueError),
        (np.inf, ValueError),
    ]:
        with pytest.raises(error, match="^n must be"):
            v.scalar_count("n", bad)
    with pytest.raises(ValueError, match=r"n must be a single integer >= 1, got an array of shape \(2,\)"):
        v.scalar_count("n", np.array([1, 2]))


def test_reals_and_cosines():
    assert v.scalar_real("x", np.float32(0.5)) == 0.5
    with pytest.raises(ValueError, match=r"x must be in \(0, 1\], got 0.0"):
        v.real("x", [0.5, 0.0], low=0.0, high=1.0, low_open=True)
    with pytest.raises(ValueError, match="x must be finite, got inf"):
        v.real("x", np.inf, allow_nan=True)
    assert np.isnan(v.real("x", np.nan, allow_nan=True))
    with pytest.raises(ValueError, match=r"c is a cosine and must lie in \[-1, 1\], got -1.5"):
        v.cosine("c", [0.0, -1.5])
    with pytest.raises(TypeError, match="f must be True or False, got int 1"):
        v.flag("f", 1)
    with pytest.raises(ValueError, match=r"k must be one of \['a', 'b'\], got 'c'"):
        v.choice("k", "c", ("a", "b"))


def test_broadcast_names_the_arguments():
    a, b = v.broadcast(x=np.ones(3), y=np.ones((2, 1)))
    assert a.shape == b.shape == (2, 3)
    with pytest.raises(ValueError, match=r"incompatible shapes: x \(3,\), y \(2,\)"):
        v.broadcast(x=np.ones(3), y=np.ones(2))


def test_memory_guard(monkeypatch):
    assert v.format_bytes(512) == "512 bytes" and v.format_bytes(8 * 2**40) == "8 TiB"
    assert v.memory_limit() > 0
    monkeypatch.setattr(v, "memory_limit", lambda device=None: 1 << 20)
    v.check_memory("a small thing", 1 << 20, "never mind")
    with pytest.raises(ValueError, match=r"a big thing needs 2 MiB of memory at once, more than the 1 MiB .*; do less"):
        v.check_memory("a big thing", 2 << 20, "do less")
