"""The Triton butterfly kernel equals the torch path: on CPU under ``TRITON_INTERPRET=1`` (set here,
before the kernel module is imported, only when there is no CUDA device), on the GPU natively."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from qwha import hadamard as hd  # noqa: E402
from qwha.kernels import fwht as kernels  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    DEVICE == "cpu" and not kernels.interpreted(), reason="TRITON_INTERPRET was switched off for this run"
)


@pytest.mark.parametrize("p", [2, 4, 8, 64, 512, 2048])
@pytest.mark.parametrize("rows", [1, 7, 130])
def test_butterflies_equal_torch(p, rows):
    torch.manual_seed(p + rows)
    x = torch.randn(rows, p, device=DEVICE)
    y = kernels.butterflies(x, scale=0.25)
    ref = hd._butterflies_torch(x.clone()) * 0.25
    assert y.dtype == torch.float32
    assert torch.allclose(y, ref, rtol=1e-6, atol=1e-5 * p**0.5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_round_once(dtype):
    torch.manual_seed(0)
    x = torch.randn(33, 256, device=DEVICE).to(dtype)
    y = kernels.butterflies(x, scale=1 / 16, out_dtype=dtype)
    ref = (hd._butterflies_torch(x.double()) / 16).to(dtype)  # exact result, rounded once
    assert y.dtype == dtype
    # float32 arithmetic can flip a tie: at most one unit in the last place of ``dtype``
    ulp = ref.double().abs() * {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}[dtype]
    assert bool(((y.double() - ref.double()).abs() <= ulp + 1e-6).all())


@pytest.mark.parametrize("n", [12 * 16, 1024, 36 * 64, 28 * 128])
def test_fwht_backend_triton_equals_torch(n):
    torch.manual_seed(n)
    x = torch.randn(2, 5, n, device=DEVICE, requires_grad=True)
    y_t = hd.fwht(x, backend="triton")
    y_r = hd.fwht(x, backend="torch")
    assert torch.allclose(y_t, y_r, rtol=1e-5, atol=1e-5)
    assert torch.allclose(hd.ifwht(y_t, backend="triton"), x, rtol=1e-4, atol=1e-4)
    g = torch.randn_like(y_t)
    (gx_t,) = torch.autograd.grad((y_t * g).sum(), x)
    (gx_r,) = torch.autograd.grad((y_r * g).sum(), x)
    assert torch.allclose(gx_t, gx_r, rtol=1e-5, atol=1e-5)


def test_unsupported_lengths_are_refused():
    with pytest.raises(ValueError, match="power of two"):
        kernels.butterflies(torch.zeros(2, 12, device=DEVICE))
    assert not kernels.supports(2 ** (kernels.MAX_LOG_P + 1))
