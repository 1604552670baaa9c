"""The Triton ℓ∞-prox kernel (MagR on the GPU) against an independent float64 bisection and the torch
path: on CPU under ``TRITON_INTERPRET=1`` (set by the package when the host has no CUDA device), on
the GPU compiled."""

from __future__ import annotations

import pytest
import torch

from qwha.kernels import prox as kernels
from qwha.kernels.fwht import interpreted
from qwha.quant.magr import magr, prox_linf
from tests.test_magr import prox_linf_bisection

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    DEVICE == "cpu" and not interpreted(), reason="TRITON_INTERPRET was switched off for this run"
)


# Under the interpreter a 256-wide sort costs ~25 s per case, so the long group runs on the GPU only.
@pytest.mark.parametrize("group", [2, 16, 64] + ([256, 1024] if DEVICE == "cuda" else []))
@pytest.mark.parametrize("alpha", [1e-5, 0.05, 1.0, 1e3])
def test_kernel_equals_bisection(group, alpha):
    """Every regime: nothing clipped but the top entry (small α), many clipped, all zero (α ≥ ‖v‖₁)."""
    torch.manual_seed(group)
    v = torch.randn(29, 3, group, dtype=torch.float64) * torch.rand(29, 3, 1, dtype=torch.float64)
    v[0, 0] = 0.0  # an all-zero group
    v[1, 1, :2] = 5.0  # a tie at the top
    got = kernels.prox_linf_groups(v.float().to(DEVICE), alpha)
    ref = prox_linf_bisection(v, alpha)
    assert got.dtype == torch.float32 and got.shape == v.shape
    torch.testing.assert_close(got.cpu().double(), ref, atol=2e-6, rtol=0)


def test_kernel_equals_torch_newton_path():
    torch.manual_seed(1)
    v = torch.randn(70, 64, device=DEVICE) * 0.02
    kern = kernels.prox_linf_groups(v, 1e-3)
    torch_path = prox_linf(v.cpu(), 1e-3)  # the CPU tensor never takes the kernel
    torch.testing.assert_close(kern.cpu(), torch_path, atol=1e-7, rtol=0)


def test_unsupported_group_lengths_refused():
    assert not kernels.supports(torch.zeros(4, 576, device=DEVICE))  # not a power of two
    assert not kernels.supports(torch.zeros(4, 2048, device=DEVICE))  # longer than MAX_GROUP
    with pytest.raises(RuntimeError, match="group length 576"):
        kernels.prox_linf_groups(torch.zeros(4, 576, device=DEVICE), 0.1)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA: MagR dispatches to the kernel on CUDA tensors")
def test_magr_on_cuda_equals_cpu():
    torch.manual_seed(2)
    w = torch.randn(64, 256) * 0.02
    x = torch.randn(1024, 256) * torch.exp(torch.randn(256))
    g = x.T @ x
    cpu = magr(w, g, 64, alpha=1e-4, iters=30)
    gpu = magr(w.cuda(), g.cuda(), 64, alpha=1e-4, iters=30).cpu()
    assert (cpu - w).abs().max() > 1e-4  # MagR moved the weight
    torch.testing.assert_close(gpu, cpu, atol=2e-5, rtol=0)
