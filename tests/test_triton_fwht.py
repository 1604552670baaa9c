"""The Triton Walsh-Hadamard kernels equal the torch path and the dense float64 transform: on CPU under
``TRITON_INTERPRET=1`` (set by the package when the host has no CUDA device), on the GPU compiled."""

from __future__ import annotations

import pytest
import torch

from qwha import hadamard as hd
from qwha.kernels import fwht as kernels

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


# Every projection width of the model families the project targets: SmolLM2-135M (576, 1536, k/v 192),
# Llama-3.2-3B (3072, 8192, k/v 1024), Llama-3.1-8B / Mistral-7B (4096, 14336, k/v 1024), Llama-2-7B
# (11008), Llama-2-13B (5120, 13824), Qwen2.5-7B (3584, 18944, k/v 512), Gemma-2-2B (2304), Qwen2.5-0.5B
# (896, 4864), plus 2048.
WIDTHS = [192, 576, 896, 1024, 1536, 2048, 2304, 3072, 3584, 4096, 4864, 5120, 8192]
WIDTHS += [11008, 13824, 14336, 18944]


def _dense_reference(x: torch.Tensor, n: int, inverse: bool) -> torch.Tensor:
    """``x · H`` (or ``x · Hᵀ``) in float64 from the two dense factors: ``x·(H_m ⊗ H_P) = vec(H_mᵀ X H_P)``
    for ``X = x`` viewed ``[m, P]`` (the mixed-product rule; no butterflies, no n × n matrix)."""
    m, p = hd.hadamard_factors(n)
    hm = hd.hadamard_matrix(m) if m <= 2 else hd._small_hadamard(m) / m**0.5
    hp = hd.hadamard_matrix(p)  # Sylvester, symmetric
    hm = hm.T if not inverse else hm
    return (hm @ x.double().view(-1, m, p) @ hp).reshape(-1, n)


def test_dense_reference_is_the_hadamard_matrix():
    x = torch.randn(2, 576, dtype=torch.float64)
    h = hd.hadamard_matrix(576)
    assert torch.allclose(_dense_reference(x, 576, False), x @ h, atol=1e-12)
    assert torch.allclose(_dense_reference(x, 576, True), x @ h.T, atol=1e-12)


@pytest.mark.parametrize("n", WIDTHS)
def test_fused_transform_equals_dense_float64(n):
    m, p = hd.hadamard_factors(n)
    rows = 2 if n <= 4096 else 1  # the interpreter is slow; one row exercises every (a, b) of m × P
    torch.manual_seed(n)
    x = torch.randn(rows, n, dtype=torch.float64)
    for inverse in (False, True) if n <= 4096 else (False,):
        ref = _dense_reference(x, n, inverse)
        fn = hd.ifwht if inverse else hd.fwht
        y = fn(x.float().to(DEVICE), backend="triton")
        assert y.dtype == torch.float32 and y.shape == (rows, n)
        err = (y.double().cpu() - ref).abs().max().item()
        assert err <= 1e-5 * (1 + ref.abs().max().item()), (n, m, p, inverse, err)


@pytest.mark.parametrize("n", [576, 3072])
def test_fused_transform_bf16_in_and_out(n):
    torch.manual_seed(n)
    x = torch.randn(3, n).to(torch.bfloat16).to(DEVICE)
    y = hd.fwht(x, backend="triton")
    ref = _dense_reference(x.cpu(), n, False)  # exact transform of the bf16 input
    assert y.dtype == torch.bfloat16
    # float32 arithmetic, one conversion to bf16: within one bf16 ulp (Triton's interpreter converts
    # by its own rule, not always to nearest; same bound as test_half_inputs_round_once)
    bound = ref.abs() * 2.0**-7 + 1e-5 * ref.abs().max()
    assert bool(((y.double().cpu() - ref).abs() <= bound).all())


def test_fused_transform_refuses_bad_shapes():
    f = torch.eye(12)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.fused_transform(torch.zeros(2, 100, device=DEVICE), f, 8, 1.0)
    with pytest.raises(ValueError, match="power of two"):
        kernels.fused_transform(torch.zeros(2, 36, device=DEVICE), f, 3, 1.0)
