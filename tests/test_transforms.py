"""qwha.transforms against independent definitions (numpy FFT for DHT, the DCT-II sum, orthogonality)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qwha.transforms import TRANSFORMS, apply_transform, transform_matrix


@pytest.mark.parametrize("kind", TRANSFORMS)
@pytest.mark.parametrize("n", [12, 20, 64, 576])
def test_orthonormal(kind, n):
    t = transform_matrix(kind, n)
    assert t.shape == (n, n) and t.dtype == torch.float64
    assert torch.allclose(t @ t.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)


def test_dht_is_real_minus_imaginary_fft():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 40))
    f = np.fft.fft(x, axis=-1)
    expected = (f.real - f.imag) / math.sqrt(40)
    got = torch.from_numpy(x) @ transform_matrix("dht", 40)
    assert np.allclose(got.numpy(), expected, atol=1e-12)


def test_dct_is_orthonormal_dct2():
    n = 16
    x = np.random.default_rng(1).standard_normal(n)
    k = np.arange(n)
    expected = np.array([np.sum(x * np.cos(np.pi * (2 * k + 1) * kk / (2 * n))) for kk in range(n)])
    expected *= np.sqrt(2 / n)
    expected[0] /= np.sqrt(2)
    got = torch.from_numpy(x) @ transform_matrix("dct", n)
    assert np.allclose(got.numpy(), expected, atol=1e-12)


@pytest.mark.parametrize("kind", TRANSFORMS)
def test_apply_matches_matrix(kind):
    torch.manual_seed(0)
    x = torch.randn(3, 24, 5, dtype=torch.float64, requires_grad=True)
    t = transform_matrix(kind, 24)
    fwd = torch.einsum("aib,ij->ajb", x, t)
    inv = torch.einsum("aib,ji->ajb", x, t)
    assert torch.allclose(apply_transform(x, kind, dim=1), fwd, atol=1e-12)
    assert torch.allclose(apply_transform(x, kind, dim=1, inverse=True), inv, atol=1e-12)
    g = torch.randn_like(fwd)
    (gx,) = torch.autograd.grad((apply_transform(x, kind, dim=1) * g).sum(), x)
    (ref,) = torch.autograd.grad((fwd * g).sum(), x)
    assert torch.allclose(gx, ref, atol=1e-12)


@pytest.mark.parametrize("kind", TRANSFORMS)
def test_half_precision_keeps_dtype(kind):
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    y = apply_transform(x, kind)
    assert y.dtype == torch.bfloat16
    ref = x.double() @ transform_matrix(kind, 64)
    assert torch.allclose(y.double(), ref, rtol=2**-7, atol=1e-2)


def test_unknown_kind():
    with pytest.raises(ValueError, match="transform='fft' is not one of wht, dct, dht, identity"):
        transform_matrix("fft", 8)


def test_dht2d_adapter_matches_a_numpy_fft_reference():
    """adapter=dht2d (SSH's transform): ``ΔW = s · H_out F H_in`` with ``H`` the orthonormal DHT, here built
    from numpy's FFT (``H x = Re(FFT x) − Im(FFT x)``, scaled by 1/√n; symmetric, its own inverse); the
    layer's output and ``∂L/∂c`` against that float64 reference."""
    from torch import nn

    from qwha.adapters import WHALinear
    from tests.conftest import compose

    a = compose("adapter=dht2d").adapter
    assert (a.method, a.transform, a.dims) == ("wha", "dht", 2)
    d_out, d_in, p = 10, 14, 23

    def dht_matrix(n: int) -> torch.Tensor:
        f = np.fft.fft(np.eye(n), axis=0)
        return torch.from_numpy((f.real - f.imag) / math.sqrt(n))

    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out, dtype=torch.float64)
    layer = WHALinear(base, p, transform=a.transform, dims=int(a.dims), scale_norm="paper", alpha=5.0)
    flat = torch.randperm(d_out * d_in)[:p]
    idx = torch.stack((flat // d_in, flat % d_in), dim=1)
    layer.set_sparse(idx, torch.randn(p, dtype=torch.float64))
    rows, cols = layer.indices().unbind(1)
    c = layer.wha_c.detach().clone().requires_grad_(True)
    f = torch.zeros(d_out, d_in, dtype=torch.float64).index_put((rows, cols), c)
    delta_ref = layer.scale * dht_matrix(d_out) @ f @ dht_matrix(d_in)
    assert torch.allclose(layer.delta_weight(), delta_ref, rtol=0, atol=1e-12)

    x = torch.randn(3, d_in, dtype=torch.float64)
    g = torch.randn(3, d_out, dtype=torch.float64)
    y = layer(x)
    (grad,) = torch.autograd.grad((y * g).sum(), layer.wha_c)
    y_ref = base(x).detach() + x @ delta_ref.T
    (grad_ref,) = torch.autograd.grad((y_ref * g).sum(), c)
    assert torch.allclose(y, y_ref, rtol=0, atol=1e-12)
    assert torch.allclose(grad, grad_ref, rtol=0, atol=1e-12)
