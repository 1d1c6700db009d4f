r"""The paper's trainable key convolution (kconv): depthwise, causal, SiLU, residual.

.. math:: k'_t = k_t + \mathrm{SiLU}\Big(\sum_{\ell=0}^{W-1} w_\ell \odot k_{t-\ell}\Big),
          \qquad w_\ell \in \mathbb R^{C},\quad k_{t-\ell} = 0 \text{ for } t - \ell < 0,

over the C = heads·head_dim key channels (each channel filtered on its own, as ``groups = C``), applied to
the keys before routing and attention (see docs/design.md, "Clustering and key convolution"). The
weights start at zero, so an untrained kconv is the identity (SiLU(0) = 0) and whatever filter the model
ends with is the one training made; the gradient at zero is not zero (SiLU'(0) = 1/2).
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["KeyConv"]


class KeyConv(nn.Module):
    """Trainable causal depthwise key convolution of width ``width`` over ``channels`` channels.

    ``forward(k)`` takes keys (batch, seqlen, heads, head_dim) with heads·head_dim = ``channels`` and returns
    k' of the same shape and dtype (module docstring for the equation).

    Examples
    --------
    >>> conv = KeyConv(width=3, channels=4)
    >>> k = torch.randn(1, 5, 2, 2)
    >>> bool(torch.equal(conv(k), k))  # zero weights: the identity
    True
    >>> with torch.no_grad():
    ...     _ = conv.weight.fill_(1.0)
    >>> round(float(conv(torch.ones(1, 5, 1, 4)).detach()[0, 0, 0, 0]), 4)  # t = 0: 1 + SiLU(1)
    1.7311
    """

    def __init__(self, width: int, channels: int):
        super().__init__()
        for name, value in (("width", width), ("channels", channels)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"KeyConv: {name} must be an integer >= 1, got {value!r}")
        self.width = int(width)
        self.channels = int(channels)
        #: weight[l, c] = w_l for channel c (lag l: position t - l)
        self.weight = nn.Parameter(torch.zeros(self.width, self.channels))

    def forward(self, k: torch.Tensor) -> torch.Tensor:
        if k.dim() != 4 or k.shape[2] * k.shape[3] != self.channels:
            raise ValueError(f"KeyConv: k must be (batch, seqlen, heads, head_dim) with heads*head_dim = "
                             f"{self.channels}, got shape {tuple(k.shape)}")
        b, n, h, d = k.shape
        x = k.reshape(b, n, self.channels)
        # conv1d is a cross-correlation: kernel tap i meets x[t - (W-1) + i], i.e. lag l = W-1-i
        kernel = self.weight.flip(0).t().unsqueeze(1).to(x.dtype)  # (C, 1, W)
        mixed = F.conv1d(F.pad(x.transpose(1, 2), (self.width - 1, 0)), kernel, groups=self.channels)
        return k + F.silu(mixed.transpose(1, 2)).reshape(b, n, h, d)

    def extra_repr(self) -> str:
        return f"width={self.width}, channels={self.channels}"
