import pytest
import torch

from mobalab.training import KeyConv


def _conv(width, channels=6, seed=0):
    conv = KeyConv(width, channels)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(width, channels, generator=torch.Generator().manual_seed(seed)))
    return conv


@pytest.mark.parametrize("width", [3, 5])
def test_matches_the_equation(width):
    conv = _conv(width)
    k = torch.randn(2, 9, 2, 3)
    flat = k.reshape(2, 9, 6)
    want = torch.empty_like(flat)
    for t in range(9):
        acc = torch.zeros(2, 6)
        for lag in range(width):
            if t - lag >= 0:
                acc = acc + conv.weight[lag] * flat[:, t - lag]
        want[:, t] = flat[:, t] + torch.nn.functional.silu(acc)
    torch.testing.assert_close(conv(k), want.reshape(2, 9, 2, 3))


@pytest.mark.parametrize("width", [3, 5])
def test_causal(width):
    conv = _conv(width)
    k = torch.randn(1, 20, 2, 3)
    s = 11
    k2 = k.clone()
    k2[:, s] += 1.0
    diff = (conv(k2) - conv(k)).abs().amax(dim=(0, 2, 3))
    assert bool((diff[:s] == 0).all())  # the past never sees position s
    assert bool((diff[s:s + width] > 0).all())  # positions s .. s+W-1 do
    assert bool((diff[s + width:] == 0).all())  # and nothing beyond the window


def test_zero_init_is_identity_with_gradient():
    conv = KeyConv(3, 4)
    k = torch.randn(1, 7, 1, 4, requires_grad=True)
    out = conv(k)
    assert torch.equal(out, k)
    out.pow(2).sum().backward()
    assert conv.weight.grad is not None and float(conv.weight.grad.abs().sum()) > 0


def test_validation():
    with pytest.raises(ValueError, match="width"):
        KeyConv(0, 4)
    with pytest.raises(ValueError, match="heads\\*head_dim"):
        KeyConv(3, 4)(torch.randn(1, 5, 2, 3))
