r"""Planted-needle generators: unit vectors, keys with a planted cosine to the query, and a needle layout.

See docs/design.md, "Generator variance".

The generative model behind :mod:`mobalab.snr`'s ``generator_block_model``:

* the query ``q`` and every noise key are uniform on the unit sphere :math:`S^{d-1}`, so for a noise key
  :math:`q\cdot k` has mean 0 and variance :math:`1/d`;
* a planted key with cosine ``mu`` is :math:`k = \mu q + \sqrt{1-\mu^2}\,\xi`, where

  - ``planted="isotropic"``: :math:`\xi` is uniform on :math:`S^{d-1}`, independent of ``q``; then
    :math:`q\cdot k` has mean :math:`\mu` and variance :math:`(1-\mu^2)/d` (``k`` is not exactly unit norm);
  - ``planted="exact"``: :math:`\xi` is uniform on the unit sphere orthogonal to ``q``; then
    :math:`q\cdot k = \mu` and :math:`\|k\| = 1` exactly (up to rounding);

* the needle (cosine ``mu_signal``) sits at one position; ``m - 1`` clustered keys (cosine ``mu_cluster``) sit
  at other positions, by default distinct random positions inside the needle's block.

Every function takes an explicit random stream: a ``numpy.random.Generator`` (numpy arrays out) or a
``torch.Generator`` (torch tensors out, on the generator's device). That device-generic path is the one
the vector-level router uses on GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._validate import check_memory, choice, cosine, scalar_cosine, scalar_count
from .._validate import count as counts
from ._array_backend import is_torch_generator, is_torch_tensor, same_device

__all__ = [
    "PLANTED_KINDS",
    "PlantedNeedle",
    "random_unit_vectors",
    "planted_keys",
    "plant_into",
    "random_cluster_positions",
    "planted_needle",
]

PLANTED_KINDS = ("isotropic", "exact")


# ---------------------------------------------------------------------------------------------------
# numpy / torch dispatch


def _check_rng(rng) -> None:
    if not (isinstance(rng, np.random.Generator) or is_torch_generator(rng)):
        raise TypeError(f"rng must be a numpy.random.Generator or a torch.Generator, got {type(rng).__name__}")


def _to_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if is_torch_tensor(x) else np.asarray(x)


def _check_kind(rng, name: str, x) -> None:
    """``x`` must be a torch tensor on the generator's device for a torch.Generator, else a numpy array."""
    if is_torch_generator(rng) != is_torch_tensor(x):
        raise TypeError(
            f"{name} must be a torch tensor for a torch.Generator and a numpy array for a numpy Generator, "
            f"got {name} of type {type(x).__name__} with rng of type {type(rng).__name__}"
        )
    if is_torch_tensor(x) and not same_device(x.device, rng.device):
        raise ValueError(f"{name} is on {x.device} but the torch.Generator is on {rng.device}")


def _check_unit(name: str, x) -> None:
    norms = np.sqrt(np.asarray(_to_numpy(_dot_last(x, x)), dtype=np.float64))
    if norms.size and not np.all(np.abs(norms - 1.0) <= 1e-3):
        raise ValueError(f"{name} must hold unit vectors, got norms from {norms.min()} to {norms.max()}")


def _default_dtype(rng):
    if is_torch_generator(rng):
        import torch

        return torch.float32
    return np.float32


def _float_dtype(rng, dtype):
    """``dtype`` (default: float32) checked against what the stream can draw normals in."""
    if dtype is None:
        return _default_dtype(rng)
    if is_torch_generator(rng):
        import torch

        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point torch.dtype for a torch.Generator, got {dtype!r}")
        return dtype
    try:
        ok = np.dtype(dtype) in (np.float32, np.float64)
    except TypeError:
        ok = False
    if not ok:
        raise TypeError(f"dtype must be numpy.float32 or numpy.float64 for a numpy Generator, got {dtype!r}")
    return dtype


def _normal(rng, shape, dtype):
    if is_torch_generator(rng):
        import torch

        return torch.randn(shape, generator=rng, device=rng.device, dtype=dtype)
    return rng.standard_normal(shape, dtype=dtype)


def _uniform01(rng, shape) -> np.ndarray:
    """Uniform [0, 1) numbers as a numpy array, whatever the stream (used for positions only)."""
    if is_torch_generator(rng):
        import torch

        return torch.rand(shape, generator=rng, device=rng.device, dtype=torch.float64).cpu().numpy()
    return rng.random(shape)


def _integer(rng, low: int, high: int) -> int:
    """One integer uniform on ``{low, ..., high - 1}``."""
    if is_torch_generator(rng):
        import torch

        return int(torch.randint(low, high, (1,), generator=rng, device=rng.device).item())
    return int(rng.integers(low, high))


def _unit_inplace(x):
    """Normalise freshly drawn vectors in place (saves a full-size temporary in the inner loop)."""
    if is_torch_tensor(x):
        import torch

        return x.div_(torch.linalg.vector_norm(x, dim=-1, keepdim=True))
    x /= np.sqrt(np.einsum("...i,...i->...", x, x))[..., None]
    return x


def _dot_last(a, b):
    return (a * b).sum(-1)


def _as_like(value, ref):
    """``value`` (scalar or array) as an array of ``ref``'s kind, dtype and device."""
    if is_torch_tensor(ref):
        import torch

        return torch.as_tensor(value, dtype=ref.dtype, device=ref.device)
    return np.asarray(value, dtype=ref.dtype)


def _shape_tuple(shape) -> tuple:
    if isinstance(shape, int | np.integer) and not isinstance(shape, bool | np.bool_):
        return (scalar_count("shape", shape, 0),)
    if not isinstance(shape, tuple | list):
        raise TypeError(f"shape must be an int or a tuple of ints, got {type(shape).__name__} {shape!r}")
    return tuple(scalar_count("shape entry", s, 0) for s in shape)


# ---------------------------------------------------------------------------------------------------
# vectors


def random_unit_vectors(rng, shape, d: int, dtype=None):
    r"""Vectors uniform on :math:`S^{d-1}`: :math:`g/\|g\|` with :math:`g \sim \mathcal N(0, I_d)`.

    Returns an array of shape ``(*shape, d)`` (float32 unless ``dtype`` says otherwise): numpy for a numpy
    Generator, torch on the generator's device for a torch.Generator.

    Examples
    --------
    >>> import numpy as np
    >>> from mobalab import simulate
    >>> x = simulate.random_unit_vectors(np.random.default_rng(0), (2, 3), 64)
    >>> print(x.shape, x.dtype, np.allclose(np.linalg.norm(x, axis=-1), 1.0, atol=1e-6))
    (2, 3, 64) float32 True
    """
    _check_rng(rng)
    d = scalar_count("d", d)
    shape = _shape_tuple(shape)
    dtype = _float_dtype(rng, dtype)
    itemsize = dtype.itemsize if is_torch_generator(rng) else np.dtype(dtype).itemsize
    check_memory(
        f"random_unit_vectors of shape {(*shape, d)}",
        2 * itemsize * d * float(np.prod(shape, dtype=np.float64)),
        "draw them in smaller batches",
        device=getattr(rng, "device", None),
    )
    return _unit_inplace(_normal(rng, (*shape, d), dtype))


def _planted(rng, q, mu, planted: str):
    """The planted-key equation without argument checks (used in the vector router's inner loop)."""
    mu = _as_like(mu, q)[..., None]
    if planted == "isotropic":
        xi = _unit_inplace(_normal(rng, tuple(q.shape), q.dtype))
    else:
        g = _normal(rng, tuple(q.shape), q.dtype)
        # Two Gram-Schmidt passes: one leaves |q.xi| at the rounding level times |g|, the second at rounding.
        for _ in range(2):
            g = g - _dot_last(g, q)[..., None] * q
        xi = _unit_inplace(g)
    return mu * q + (1.0 - mu * mu) ** 0.5 * xi


def planted_keys(rng, q, mu, planted: str = "isotropic"):
    r"""Keys with a planted cosine to unit queries ``q``: :math:`k = \mu q + \sqrt{1-\mu^2}\,\xi`.

    .. math:: k = \mu q + \sqrt{1-\mu^2}\,\xi,\qquad q\cdot k = \mu + \sqrt{1-\mu^2}\,q\cdot\xi

    ``q``: (..., d) unit vectors (numpy for a numpy Generator, torch on the generator's device for a
    torch.Generator). ``mu``: a scalar or an array broadcastable to ``q.shape[:-1]``, each in [-1, 1].
    ``planted="isotropic"``: :math:`\xi` uniform on :math:`S^{d-1}` independent of q, so
    :math:`q\cdot k` has mean :math:`\mu` and variance :math:`(1-\mu^2)/d`. ``planted="exact"``:
    :math:`\xi` uniform on the unit sphere orthogonal to q, so :math:`q\cdot k=\mu` and :math:`\|k\|=1`.
    Returns keys of ``q``'s shape and dtype.

    Examples
    --------
    Exact planting puts every key at cosine 0.5 with its query; isotropic planting only on average, with
    variance (1 - 0.5²)/64 ≈ 0.0117:

    >>> import numpy as np
    >>> from mobalab import simulate
    >>> rng = np.random.default_rng(0)
    >>> q = simulate.random_unit_vectors(rng, 20_000, 64, dtype=np.float64)
    >>> exact = simulate.planted_keys(rng, q, 0.5, planted="exact")
    >>> print(np.allclose((q * exact).sum(-1), 0.5), np.allclose(np.linalg.norm(exact, axis=-1), 1.0))
    True True
    >>> cosines = (q * simulate.planted_keys(rng, q, 0.5)).sum(-1)
    >>> print(round(cosines.mean(), 2), round(cosines.var(), 3))
    0.5 0.012
    """
    _check_rng(rng)
    choice("planted", planted, PLANTED_KINDS)
    _check_kind(rng, "q", q)
    if not is_torch_tensor(q):
        q = np.asarray(q)
        if not np.issubdtype(q.dtype, np.floating):
            q = q.astype(np.float64)
    if q.ndim < 1 or q.shape[-1] < 1:
        raise ValueError(f"q must have shape (..., d) with d >= 1, got shape {tuple(q.shape)}")
    if planted == "exact" and q.shape[-1] < 2:
        raise ValueError("planted='exact' needs d >= 2 (a direction orthogonal to q), got d = 1")
    _check_unit("q", q)
    mu_np = cosine("mu", _to_numpy(mu) if is_torch_tensor(mu) else mu)
    try:
        np.broadcast_shapes(mu_np.shape, tuple(q.shape[:-1]))
    except ValueError:
        raise ValueError(
            f"mu of shape {mu_np.shape} does not broadcast to q.shape[:-1] = {tuple(q.shape[:-1])}"
        ) from None
    return _planted(rng, q, mu, planted)


def plant_into(rng, q, keys, needle_pos, cluster_pos, mu_signal: float, mu_cluster: float, planted: str):
    r"""Overwrite, in place, the needle and the clustered keys of a batch of sequences; returns ``keys``.

    .. math:: k_{b,p_b} = \mu_s q_b + \sqrt{1-\mu_s^2}\,\xi,\qquad
              k_{b,c} = \mu_c q_b + \sqrt{1-\mu_c^2}\,\xi_c\quad (c \in \text{cluster\_pos}_b)

    ``q``: (b, d) unit vectors; ``keys``: (b, L, d); ``needle_pos``: (b,) ints; ``cluster_pos``: (b, m-1)
    ints (m-1 may be 0), positions in [0, L), all of the array kind and device of the generator. The needle
    key is ``planted_keys(q, mu_signal)`` and each clustered key an independent ``planted_keys(q,
    mu_cluster)``.

    Examples
    --------
    >>> import numpy as np
    >>> from mobalab import simulate
    >>> rng = np.random.default_rng(0)
    >>> q = simulate.random_unit_vectors(rng, (2,), 16)
    >>> keys = simulate.random_unit_vectors(rng, (2, 32), 16)
    >>> needle, cluster = np.array([5, 30]), np.array([[6, 7], [28, 29]])
    >>> _ = simulate.plant_into(rng, q, keys, needle, cluster, 0.8, 0.5, "exact")
    >>> print(np.einsum("bd,bd->b", q, keys[[0, 1], needle]).round(4))
    [0.8 0.8]
    """
    _check_rng(rng)
    choice("planted", planted, PLANTED_KINDS)
    mu_signal = scalar_cosine("mu_signal", mu_signal)
    mu_cluster = scalar_cosine("mu_cluster", mu_cluster)
    for name, x in (("q", q), ("keys", keys), ("needle_pos", needle_pos), ("cluster_pos", cluster_pos)):
        _check_kind(rng, name, x)
    if q.ndim != 2 or keys.ndim != 3 or keys.shape[0] != q.shape[0] or keys.shape[2] != q.shape[1]:
        raise ValueError(
            f"q must be (b, d) and keys (b, L, d) of the same b and d, got q {tuple(q.shape)} and keys "
            f"{tuple(keys.shape)}"
        )
    b, n_tok = q.shape[0], keys.shape[1]
    if tuple(needle_pos.shape) != (b,) or cluster_pos.ndim != 2 or cluster_pos.shape[0] != b:
        raise ValueError(
            f"needle_pos must be ({b},) and cluster_pos ({b}, m - 1), got {tuple(needle_pos.shape)} and "
            f"{tuple(cluster_pos.shape)}"
        )
    for name, x in (("needle_pos", needle_pos), ("cluster_pos", cluster_pos)):
        pos = counts(name, _to_numpy(x), 0)
        if pos.size and pos.max() >= n_tok:
            raise ValueError(f"{name} must lie in [0, L = {n_tok}) (keys.shape[1]), got {pos.max()}")
    if planted == "exact" and q.shape[1] < 2:
        raise ValueError("planted='exact' needs d >= 2 (a direction orthogonal to q), got d = 1")
    _check_unit("q", q)
    return _plant_into(rng, q, keys, needle_pos, cluster_pos, mu_signal, mu_cluster, planted)


def _plant_into(rng, q, keys, needle_pos, cluster_pos, mu_signal: float, mu_cluster: float, planted: str):
    """:func:`plant_into` without argument checks: the device-generic inner step of the vector router."""
    b = q.shape[0]
    if is_torch_tensor(keys):
        import torch

        rows = torch.arange(b, device=keys.device)
    else:
        rows = np.arange(b)
    keys[rows, needle_pos] = _planted(rng, q, mu_signal, planted)
    n_cluster = cluster_pos.shape[1]
    if n_cluster:
        q_rep = (
            q[:, None, :].expand(b, n_cluster, q.shape[1])
            if is_torch_tensor(q)
            else np.broadcast_to(q[:, None, :], (b, n_cluster, q.shape[1]))
        )
        keys[rows[:, None], cluster_pos] = _planted(rng, q_rep, mu_cluster, planted)
    return keys


# ---------------------------------------------------------------------------------------------------
# positions


def random_cluster_positions(rng, needle_pos, block_size: int, seq_len: int, count: int) -> np.ndarray:
    r"""``count`` distinct random positions in each needle's block, other than the needle (numpy int64).

    .. math:: C_b \sim \mathrm{Uniform}\{S \subset [jB, \min((j+1)B, N)) \setminus \{p_b\} : |S| = \text{count}\},
              \quad j = \lfloor p_b / B \rfloor

    ``needle_pos``: (b,) positions in ``[0, seq_len)``. Block ``j = p // block_size`` holds positions
    ``[j*B, min((j+1)*B, seq_len))``; the positions are a uniformly random ``count``-subset of it minus the
    needle. Raises ValueError when some needle's block has fewer than ``count + 1`` positions.

    Examples
    --------
    Two companions for a needle at 3 (block 0 of 8) and one at 20 (the partial last block 16..21):

    >>> import numpy as np
    >>> from mobalab import simulate
    >>> pos = simulate.random_cluster_positions(np.random.default_rng(0), [3, 20], 8, 22, 2)
    >>> print(pos.shape, bool(np.all(pos // 8 == np.array([[0], [2]]))), bool(np.all(pos != [[3], [20]])))
    (2, 2) True True
    """
    _check_rng(rng)
    block_size = scalar_count("block_size", block_size)
    seq_len = scalar_count("seq_len", seq_len)
    count = scalar_count("count", count, 0)
    needle_pos = counts("needle_pos", needle_pos, 0)
    if needle_pos.ndim != 1:
        raise ValueError(f"needle_pos must be a 1-d array (b,), got shape {needle_pos.shape}")
    if needle_pos.size and needle_pos.max() >= seq_len:
        raise ValueError(f"needle_pos must lie in [0, seq_len = {seq_len}), got {needle_pos.max()}")
    start = (needle_pos // block_size) * block_size
    length = np.minimum(block_size, seq_len - start)
    if count == 0 or needle_pos.size == 0:
        return np.zeros((needle_pos.shape[0], count), dtype=np.int64)
    if needle_pos.size and np.min(length) - 1 < count:
        raise ValueError(
            f"m - 1 = {count} clustered keys do not fit in a block of {int(np.min(length))} positions beside "
            f"the needle (block_size={block_size}, seq_len={seq_len})"
        )
    # A uniformly random permutation of the free slots (argsort of i.i.d. uniforms); slots past the
    # block's real length are pushed to the end so a partial last block draws only from its own slots.
    # Width: the longest block that holds a needle (never more than seq_len, whatever block_size is).
    width = int(length.max()) - 1
    u = _uniform01(rng, (needle_pos.shape[0], width))
    u[np.arange(width)[None, :] >= (length - 1)[:, None]] = np.inf
    slot = np.argsort(u, axis=1, kind="stable")[:, :count]
    offset = (needle_pos - start)[:, None]
    return start[:, None] + slot + (slot >= offset)


@dataclass(frozen=True)
class PlantedNeedle:
    r"""One query and one key sequence with a planted needle (see :func:`planted_needle`).

    n_blocks = :math:`\lceil N/B \rceil`, needle_block = :math:`\lfloor p/B \rfloor`, m = 1 + len(cluster_pos).

    Examples
    --------
    >>> import numpy as np
    >>> from mobalab import simulate
    >>> needle = simulate.planted_needle(np.random.default_rng(0), 64, 1000, 32, 0.5)
    >>> print(needle.head_dim, needle.seq_len, needle.n_blocks, needle.m)
    64 1000 32 1
    >>> print(needle.needle_block == needle.needle_pos // 32)
    True
    """

    q: object  # (d,) unit query (numpy array or torch tensor)
    keys: object  # (N, d) keys
    needle_pos: int
    cluster_pos: np.ndarray  # (m-1,) int64 positions of the clustered keys
    block_size: int
    mu_signal: float
    mu_cluster: float
    planted: str

    @property
    def head_dim(self) -> int:
        return int(self.q.shape[-1])

    @property
    def seq_len(self) -> int:
        return int(self.keys.shape[0])

    @property
    def m(self) -> int:
        return 1 + len(self.cluster_pos)

    @property
    def n_blocks(self) -> int:
        return -(-self.seq_len // self.block_size)

    @property
    def needle_block(self) -> int:
        return self.needle_pos // self.block_size


def planted_needle(
    rng,
    head_dim: int,
    seq_len: int,
    block_size: int,
    mu_signal: float,
    m: int = 1,
    mu_cluster: float = 0.0,
    needle_pos: int | None = None,
    cluster_positions=None,
    planted: str = "isotropic",
    dtype=None,
) -> PlantedNeedle:
    r"""A query and ``seq_len`` keys with a needle at ``needle_pos`` and ``m - 1`` clustered keys.

    * ``q`` uniform on :math:`S^{d-1}`; noise keys i.i.d. uniform on :math:`S^{d-1}`;
    * the needle key (at ``needle_pos``, uniform on ``{0..N-1}`` when None) is
      ``planted_keys(q, mu_signal, planted)``;
    * ``m - 1`` clustered keys ``planted_keys(q, mu_cluster, planted)``, each with its own :math:`\xi`, at
      ``cluster_positions``: None or ``"block"`` for distinct random positions inside the needle's block
      (other than the needle; the m keys must fit in that block, and, with a random needle, in every
      block, the partial last one included), or an explicit sequence of ``m - 1`` distinct positions
      (not the needle's; they may lie in other blocks, e.g. a span that crosses a block boundary).

    Random draws, in order: positions, q, keys, needle, clustered keys. float32 unless ``dtype`` is given.

    Examples
    --------
    A needle and two companions of cosine 0.5 in blocks of 32, planted exactly:

    >>> import numpy as np
    >>> from mobalab import simulate
    >>> rng = np.random.default_rng(0)
    >>> nd = simulate.planted_needle(rng, 64, 1024, 32, 0.5, m=3, mu_cluster=0.5, planted="exact")
    >>> print(nd.keys.shape, nd.m, bool(np.all(nd.cluster_pos // 32 == nd.needle_block)))
    (1024, 64) 3 True
    >>> print((nd.keys[[nd.needle_pos, *nd.cluster_pos]] @ nd.q).round(4))
    [0.5 0.5 0.5]
    """
    _check_rng(rng)
    head_dim = scalar_count("head_dim", head_dim)
    seq_len = scalar_count("seq_len", seq_len)
    block_size = scalar_count("block_size", block_size)
    mu_signal = scalar_cosine("mu_signal", mu_signal)
    mu_cluster = scalar_cosine("mu_cluster", mu_cluster)
    m = scalar_count("m", m)
    choice("planted", planted, PLANTED_KINDS)
    dtype = _float_dtype(rng, dtype)
    if planted == "exact" and head_dim < 2:
        raise ValueError("planted='exact' needs head_dim >= 2 (a direction orthogonal to q), got 1")
    if m > seq_len:
        raise ValueError(f"m = {m} planted keys do not fit in seq_len = {seq_len}")
    if needle_pos is not None:
        needle_pos = scalar_count("needle_pos", needle_pos, 0)
        if needle_pos >= seq_len:
            raise ValueError(f"needle_pos must be in [0, seq_len = {seq_len}), got {needle_pos}")
    in_block = cluster_positions is None or (isinstance(cluster_positions, str) and cluster_positions == "block")
    if in_block:
        # Checked before any draw: a random needle may land in the partial last block, the shortest one.
        block = (seq_len - 1) // block_size if needle_pos is None else needle_pos // block_size
        length = min(block_size, seq_len - block * block_size)
        if m > length:
            where = "the partial last block" if length < block_size else "a block"
            raise ValueError(
                f"m = {m} planted keys (needle included) do not fit in {where} of {length} positions (seq_len = "
                f"{seq_len}, block_size = {block_size}"
                + ("" if needle_pos is None else f", needle_pos = {needle_pos}")
                + "); use a smaller m, fix needle_pos elsewhere, or give cluster_positions"
            )
    if needle_pos is None:
        needle_pos = _integer(rng, 0, seq_len)
    if in_block:
        cluster_pos = random_cluster_positions(rng, np.array([needle_pos]), block_size, seq_len, m - 1)[0]
    elif isinstance(cluster_positions, str):
        raise ValueError(
            f"cluster_positions must be None, 'block' or a sequence of positions, got {cluster_positions!r}"
        )
    else:
        cluster_pos = counts("cluster_positions", cluster_positions, 0).reshape(-1)
        if len(cluster_pos) != m - 1:
            raise ValueError(f"cluster_positions must hold m - 1 = {m - 1} positions, got {len(cluster_pos)}")
        if np.any(cluster_pos >= seq_len):
            raise ValueError(
                f"cluster_positions must lie in [0, seq_len = {seq_len}), got {cluster_pos.tolist()}"
            )
        if len(set(cluster_pos.tolist()) | {needle_pos}) != m:
            raise ValueError(
                f"cluster_positions must be distinct and differ from needle_pos = {needle_pos}, "
                f"got {cluster_pos.tolist()}"
            )
    q = random_unit_vectors(rng, (1,), head_dim, dtype)
    keys = random_unit_vectors(rng, (1, seq_len), head_dim, dtype)
    if is_torch_generator(rng):
        import torch

        p_arr = torch.tensor([needle_pos], device=rng.device)
        c_arr = torch.as_tensor(cluster_pos[None, :], device=rng.device)
    else:
        p_arr, c_arr = np.array([needle_pos]), cluster_pos[None, :]
    _plant_into(rng, q, keys, p_arr, c_arr, mu_signal, mu_cluster, planted)
    return PlantedNeedle(
        q=q[0],
        keys=keys[0],
        needle_pos=needle_pos,
        cluster_pos=cluster_pos,
        block_size=block_size,
        mu_signal=mu_signal,
        mu_cluster=mu_cluster,
        planted=planted,
    )

