r"""Depthwise causal key convolution (the paper's kconv), on numpy arrays or torch tensors.

See docs/design.md, "MoBA semantics" (key convolution) and "Clustering and key convolution".

With weights :math:`w_\ell \in \mathbb R^d` (:math:`\ell = 0..W-1`) and left zero padding
(:math:`k_{t-\ell} = 0` for :math:`t - \ell < 0`), per channel:

* ``form="residual_silu"`` (FlashMoBA App. C):
  :math:`k'_t = k_t + \mathrm{SiLU}\big(\sum_{\ell<W} w_\ell \odot k_{t-\ell}\big)`;
* ``form="linear"``: :math:`k'_t = \sum_{\ell<W} w_\ell \odot k_{t-\ell}`,

with :math:`\mathrm{SiLU}(x) = x\,\sigma(x)`. The convolution runs over the sequence axis (``-2``) of
``(..., N, d)`` keys; ``w_0`` multiplies the current token.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from scipy.special import expit

from .._validate import choice, real, scalar_count
from ._array_backend import is_torch_tensor

__all__ = ["KEY_CONV_FORMS", "KeyConv", "key_conv", "averaging_weights", "as_key_conv"]

KEY_CONV_FORMS = ("residual_silu", "linear")


def _weights_like(weights, keys):
    """``weights`` as a (W, 1) or (W, d) array of the kind, dtype and device of ``keys``."""
    if is_torch_tensor(keys):
        import torch

        w = weights if is_torch_tensor(weights) else torch.as_tensor(np.asarray(weights))
        w = w.to(device=keys.device, dtype=keys.dtype)
    else:
        w = np.asarray(weights.detach().cpu().numpy() if is_torch_tensor(weights) else weights)
        w = w.astype(keys.dtype, copy=False)
    if w.ndim == 1:
        w = w[:, None]
    return w


def _check_weights(weights, d: int):
    shape = tuple(weights.shape) if hasattr(weights, "shape") else np.shape(weights)
    if len(shape) not in (1, 2) or shape[0] < 1:
        raise ValueError(f"weights must have shape (W,) or (W, d) with W >= 1, got shape {shape}")
    if len(shape) == 2 and shape[1] != d:
        raise ValueError(f"weights of shape {shape} do not match the keys' head dim d = {d}")
    real("weights", weights.detach().cpu().numpy() if is_torch_tensor(weights) else weights)


def key_conv(keys, weights, form: str = "residual_silu"):
    r"""Depthwise causal convolution of ``keys`` (..., N, d) over the sequence axis; see the module doc.

    .. math::
        k'_t = k_t + \mathrm{SiLU}\Big(\sum_{\ell<W} w_\ell \odot k_{t-\ell}\Big)\ \ (\text{residual\_silu}),
        \qquad k'_t = \sum_{\ell<W} w_\ell \odot k_{t-\ell}\ \ (\text{linear}),\qquad k_{t<0} = 0

    ``weights``: (W,) shared by all channels or (W, d) per channel, W >= 1. Works on numpy arrays and torch
    tensors (autograd flows through the torch path); returns the keys' type, dtype and device.

    Examples
    --------
    A linear averaging filter over 2 keys, on 4 one-hot keys (left zero padding makes the first key half):

    >>> import numpy as np
    >>> from mobalab import simulate
    >>> print(simulate.key_conv(np.eye(4), simulate.averaging_weights(2), form="linear"))
    [[0.5 0.  0.  0. ]
     [0.5 0.5 0.  0. ]
     [0.  0.5 0.5 0. ]
     [0.  0.  0.5 0.5]]
    """
    choice("form", form, KEY_CONV_FORMS)
    if not is_torch_tensor(keys):
        keys = np.asarray(keys)
        if keys.dtype.kind not in "iuf":
            raise TypeError(f"keys must be a real array, got dtype {keys.dtype}")
        if keys.dtype.kind != "f":
            keys = keys.astype(np.float64)
    elif not keys.is_floating_point():
        raise TypeError(f"keys must be a floating-point tensor, got {keys.dtype}")
    if keys.ndim < 2:
        raise ValueError(f"keys must have shape (..., N, d), got shape {tuple(keys.shape)}")
    _check_weights(weights, keys.shape[-1])
    w = _weights_like(weights, keys)
    n = keys.shape[-2]
    acc = w[0] * keys
    for lag in range(1, min(w.shape[0], n)):
        # Out-of-place: acc[..., lag:, :] += ... is fine in numpy but would break torch autograd on views.
        shifted = w[lag] * keys[..., : n - lag, :]
        if is_torch_tensor(keys):
            import torch

            pad = torch.zeros_like(keys[..., :lag, :])
            acc = acc + torch.cat([pad, shifted], dim=-2)
        else:
            acc[..., lag:, :] += shifted
    if form == "linear":
        return acc
    if is_torch_tensor(keys):
        import torch

        return keys + torch.nn.functional.silu(acc)
    return keys + acc * expit(acc)


def averaging_weights(W: int, d: int | None = None) -> np.ndarray:
    r"""Weights :math:`w_\ell = 1/W` for :math:`\ell < W`: shape (W,), or (W, d) when ``d`` is given (float64).

    Examples
    --------
    >>> from mobalab import simulate
    >>> print(simulate.averaging_weights(4), simulate.averaging_weights(3, d=8).shape)
    [0.25 0.25 0.25 0.25] (3, 8)
    """
    W = scalar_count("W", W, 1)
    if d is None:
        return np.full(W, 1.0 / W)
    return np.full((W, scalar_count("d", d)), 1.0 / W)


@dataclass(frozen=True, eq=False)
class KeyConv:
    r"""A key convolution to apply before routing: ``weights`` (W,) or (W, d) and ``form``.

    ``apply(keys)`` is :func:`key_conv`: :math:`k'_t = [k_t +]\, f\big(\sum_{\ell<W} w_\ell \odot k_{t-\ell}\big)`.

    Examples
    --------
    >>> import numpy as np
    >>> from mobalab import simulate
    >>> kc = simulate.KeyConv(simulate.averaging_weights(3), form="linear")
    >>> print(kc.label, kc.width)
    linear(W=3,w=[0.3333,0.3333,0.3333]) 3
    >>> print(kc.apply(np.ones((4, 2)))[:, 0].round(3))
    [0.333 0.667 1.    1.   ]
    """

    weights: object
    form: str = "residual_silu"

    def __post_init__(self):
        choice("form", self.form, KEY_CONV_FORMS)
        w = real("weights", self.weights.detach().cpu().numpy() if is_torch_tensor(self.weights) else self.weights)
        if w.ndim not in (1, 2) or w.shape[0] < 1:
            raise ValueError(f"weights must have shape (W,) or (W, d) with W >= 1, got shape {w.shape}")

    @property
    def width(self) -> int:
        return int(np.shape(self.weights)[0])

    def check_head_dim(self, d: int) -> None:
        _check_weights(self.weights, d)

    def apply(self, keys):
        return key_conv(keys, self.weights, self.form)

    @property
    def label(self) -> str:
        """Short, stable description for the ``key_conv`` column, e.g. ``linear(W=2,w=[0.5,0.5])``."""
        w = np.asarray(
            self.weights.detach().cpu().numpy() if is_torch_tensor(self.weights) else self.weights,
            dtype=np.float64,
        )
        if w.ndim == 1:
            body = "w=[" + ",".join(f"{x:.4g}" for x in w) + "]"
        else:
            body = f"d={w.shape[1]},sha1={hashlib.sha1(np.ascontiguousarray(w).tobytes()).hexdigest()[:10]}"
        return f"{self.form}(W={self.width},{body})"


def as_key_conv(spec) -> KeyConv | None:
    """A :class:`KeyConv` or None from: None, a KeyConv, a dict with "weights" and "form", an object."""
    if spec is None or isinstance(spec, KeyConv):
        return spec
    if isinstance(spec, dict):
        unknown = set(spec) - {"weights", "form"}
        if "weights" not in spec or unknown:
            raise ValueError(
                f"key_conv dict must have 'weights' and optionally 'form', got keys {sorted(spec)}"
            )
        return KeyConv(spec["weights"], spec.get("form", "residual_silu"))
    if hasattr(spec, "weights"):
        return KeyConv(spec.weights, getattr(spec, "form", "residual_silu"))
    raise TypeError(
        f"key_conv must be None, a KeyConv, a dict or an object with .weights, got {type(spec).__name__}"
    )
