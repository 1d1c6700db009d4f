"""Key convolution against a naive per-token, per-lag, per-channel loop; numpy and torch; validation."""

import math

import numpy as np
import pytest
import torch

from mobalab.simulate import KeyConv, averaging_weights, key_conv
from mobalab.simulate._key_convolution import as_key_conv


def naive_key_conv(keys, weights, form):
    """k'_t = [k_t +] f(sum_{l<W} w_l * k_{t-l}), zero for t - l < 0; plain Python loops, float64."""
    keys = np.asarray(keys, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    *lead, n, d = keys.shape
    flat = keys.reshape(-1, n, d)
    out = np.empty_like(flat)
    for b in range(flat.shape[0]):
        for t in range(n):
            for ch in range(d):
                acc = 0.0
                for lag in range(w.shape[0]):
                    if t - lag >= 0:
                        wl = w[lag] if w.ndim == 1 else w[lag, ch]
                        acc += wl * flat[b, t - lag, ch]
                if form == "linear":
                    out[b, t, ch] = acc
                else:
                    out[b, t, ch] = flat[b, t, ch] + acc / (1.0 + math.exp(-acc))
    return out.reshape(keys.shape)


@pytest.mark.parametrize("form", ["residual_silu", "linear"])
@pytest.mark.parametrize("W", [1, 3, 5])
@pytest.mark.parametrize("per_channel", [False, True])
def test_matches_naive_loop(form, W, per_channel):
    rng = np.random.default_rng(W + 10 * per_channel)
    d = 4
    keys = rng.standard_normal((2, 3, 9, d))
    w = rng.standard_normal((W, d) if per_channel else W)
    ref = naive_key_conv(keys, w, form)
    np.testing.assert_allclose(key_conv(keys, w, form), ref, rtol=1e-12, atol=1e-12)
    out_t = key_conv(torch.from_numpy(keys), torch.from_numpy(w), form)
    assert isinstance(out_t, torch.Tensor)
    np.testing.assert_allclose(out_t.numpy(), ref, rtol=1e-12, atol=1e-12)


def test_window_longer_than_sequence():
    rng = np.random.default_rng(1)
    keys = rng.standard_normal((2, 3))
    w = rng.standard_normal((5, 3))
    np.testing.assert_allclose(key_conv(keys, w), naive_key_conv(keys, w, "residual_silu"), atol=1e-12)


def test_causal_prefix_invariance():
    """Truncating the sequence does not change earlier outputs (what the causal router relies on)."""
    rng = np.random.default_rng(2)
    keys = rng.standard_normal((5, 40, 8)).astype(np.float32)
    w = rng.standard_normal((3, 8))
    full = key_conv(keys, w)
    np.testing.assert_array_equal(key_conv(keys[:, :17], w), full[:, :17])


def test_dtype_and_type_preserved():
    keys32 = np.ones((6, 4), dtype=np.float32)
    assert key_conv(keys32, averaging_weights(3)).dtype == np.float32
    kt = torch.ones(6, 4, dtype=torch.float32)
    out = key_conv(kt, averaging_weights(3, 4), "linear")
    assert out.dtype == torch.float32
    # Linear averaging of constant keys: t+1 terms of 1/3 until the window fills.
    np.testing.assert_allclose(out[:, 0].numpy(), [1 / 3, 2 / 3, 1, 1, 1, 1], rtol=1e-6)


def test_torch_autograd_gradcheck():
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(2, 6, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda k, ww: key_conv(k, ww), (keys, w))


def test_averaging_weights():
    np.testing.assert_allclose(averaging_weights(4), np.full(4, 0.25))
    assert averaging_weights(3, 8).shape == (3, 8)
    with pytest.raises(ValueError, match="W must be an integer >= 1, got 0"):
        averaging_weights(0)


@pytest.mark.parametrize(
    "keys, weights, form, match",
    [
        (np.ones((5, 4)), np.ones(3), "gelu", "form"),
        (np.ones((5, 4)), np.ones((3, 5)), "linear", "head dim"),
        (np.ones((5, 4)), np.ones((0,)), "linear", "W >= 1"),
        (np.ones((5, 4)), np.ones((2, 2, 4)), "linear", "shape"),
        (np.ones(5), np.ones(3), "linear", r"\(\.\.\., N, d\)"),
        (np.ones((5, 4)), np.array([1.0, np.nan]), "linear", "finite"),
    ],
)
def test_validation(keys, weights, form, match):
    with pytest.raises(ValueError, match=match):
        key_conv(keys, weights, form)


def test_key_conv_spec_forms():
    kc = as_key_conv({"weights": averaging_weights(3), "form": "linear"})
    assert isinstance(kc, KeyConv) and kc.form == "linear" and kc.width == 3
    assert kc.label == "linear(W=3,w=[0.3333,0.3333,0.3333])"

    class Spec:
        weights = np.ones((5, 2))
        form = "residual_silu"

    kc2 = as_key_conv(Spec())
    assert kc2.label.startswith("residual_silu(W=5,d=2,sha1=")
    assert kc2.label == as_key_conv(Spec()).label
    assert as_key_conv(None) is None
    with pytest.raises(ValueError, match="key_conv dict"):
        as_key_conv({"w": 1})
    with pytest.raises(TypeError, match="key_conv must be"):
        as_key_conv(3)
    with pytest.raises(ValueError, match="form"):
        KeyConv(np.ones(3), "relu")
