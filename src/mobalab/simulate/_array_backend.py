"""numpy or torch: which array library a random stream or an array belongs to, without importing torch.

The simulators run the same code on numpy arrays (numpy Generator) and on torch tensors (torch.Generator,
CPU or CUDA). torch is looked up in ``sys.modules`` so that numpy-only callers never pay for importing it.
"""

from __future__ import annotations

import sys


def is_torch_generator(rng) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(rng, torch.Generator)


def is_torch_tensor(x) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def same_device(a, b) -> bool:
    """torch devices equal up to an implicit index: 'cuda' names the current CUDA device, 'cuda:0' too."""
    import torch

    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.index is None or b.index is None:
        current = torch.cuda.current_device() if a.type == "cuda" else None
        return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)
    return a.index == b.index
