"""qwha.hadamard against independent computations: dense matrices in float64, the bit formula of
Sylvester's matrix, and the defining properties of the Paley constructions."""

from __future__ import annotations

import math

import pytest
import torch

from qwha import hadamard as hd

# Every width of the models this project targets (hidden, kv, MLP).
MODEL_WIDTHS = [576, 192, 1536, 3072, 1024, 8192, 4096, 14336, 11008, 5120, 13824, 2304, 9216, 3584, 18944]
DENSE_LIMIT = 5120  # a dense float64 matrix up to here (210 MB) fits a test
FULL_ORTHO_LIMIT = 1536  # H Hᵀ = I checked by a full product up to here


def sylvester_entries(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(-1)^popcount(i & j) for index vectors, via bit parity folding (independent of the code)."""
    v = rows[:, None] & cols[None, :]
    for shift in (16, 8, 4, 2, 1):
        v = v ^ (v >> shift)
    return 1.0 - 2.0 * (v & 1).to(torch.float64)


def dense_columns(n: int, cols: torch.Tensor) -> torch.Tensor:
    """Columns ``cols`` of H_n = (H_m ⊗ H_P)/… built from H_m and the Sylvester bit formula."""
    m, p = hd.hadamard_factors(n)
    hm = hd.hadamard_matrix(m) * math.sqrt(m) if m > 1 else torch.ones(1, 1, dtype=torch.float64)
    i = torch.arange(n)
    a, b = i // p, i % p
    c, d = cols // p, cols % p
    return hm[a][:, c] * sylvester_entries(b, d) / math.sqrt(n)


def test_orders_of_model_widths():
    expected = {
        576: 36,
        192: 12,
        1536: 12,
        3072: 12,
        14336: 28,
        11008: 344,
        5120: 20,
        13824: 108,
        2304: 36,
        9216: 36,
        3584: 28,
        18944: 148,
        1024: 1,
        4096: 1,
        8192: 1,
    }
    for n, m in expected.items():
        assert hd.hadamard_factors(n) == (m, n // m)
    assert hd.paley_construction(28) == ("paley1", 27)  # needs GF(3^3)
    assert hd.paley_construction(344) == ("paley1", 343)  # needs GF(7^3)
    assert hd.paley_construction(36) == ("paley2", 17)
    assert hd.paley_construction(148) == ("paley2", 73)


@pytest.mark.parametrize("q", [3, 7, 9, 25, 27, 49, 81, 125, 343])
def test_jacobsthal_matrix_of_prime_power_fields(q):
    # Q Qᵀ = q I − J and Q J = 0 characterise the quadratic character of GF(q) (Paley's lemma);
    # wrong GF(p^e) arithmetic breaks them.
    jac = torch.from_numpy(hd._quadratic_character_matrix(q).astype("float64"))
    ones = torch.ones(q, q, dtype=torch.float64)
    assert torch.equal(jac @ jac.T, q * torch.eye(q, dtype=torch.float64) - ones)
    assert torch.equal(jac @ ones, torch.zeros(q, q, dtype=torch.float64))
    sign = -1 if q % 4 == 3 else 1
    assert torch.equal(jac.T, sign * jac)


@pytest.mark.parametrize("m", [m for m in hd.supported_orders(400)])
def test_every_small_order_is_hadamard(m):
    h = hd.hadamard_matrix(m)
    assert float((h.abs() - 1 / math.sqrt(m)).abs().max()) <= 1e-15
    assert torch.allclose(h @ h.T, torch.eye(m, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [n for n in MODEL_WIDTHS if n <= DENSE_LIMIT])
def test_fwht_matches_dense_matrix(n):
    torch.manual_seed(n)
    h = hd.hadamard_matrix(n)
    assert float((h.abs() - 1 / math.sqrt(n)).abs().max()) <= 1e-15
    cols = torch.randperm(n)[:32]
    assert torch.allclose(h[:, cols], dense_columns(n, cols), rtol=0, atol=1e-15)
    if n <= FULL_ORTHO_LIMIT:
        assert torch.allclose(h @ h.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    x = torch.randn(2, 3, n, dtype=torch.float64)
    assert torch.allclose(hd.fwht(x), x @ h, rtol=0, atol=1e-12)
    assert torch.allclose(hd.ifwht(x), x @ h.T, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [n for n in MODEL_WIDTHS if n > DENSE_LIMIT])
def test_fwht_large_widths(n):
    torch.manual_seed(n)
    x = torch.randn(3, n, dtype=torch.float64)
    y = hd.fwht(x)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-12, atol=0)
    assert torch.allclose(hd.ifwht(y), x, rtol=0, atol=1e-12)
    assert torch.allclose(hd.fwht(hd.ifwht(x)), x, rtol=0, atol=1e-12)
    cols = torch.randperm(n)[:48]
    hcols = dense_columns(n, cols)  # [n, 48]: the dense product on these output coordinates
    assert torch.allclose(y[:, cols], x @ hcols, rtol=0, atol=1e-12)
    hrows = dense_rows(n, cols)  # [48, n]: (x Hᵀ)[j] = H[j, :] · x
    assert torch.allclose(hd.ifwht(x)[:, cols], x @ hrows.T, rtol=0, atol=1e-12)


def dense_rows(n: int, rows: torch.Tensor) -> torch.Tensor:
    """Rows ``rows`` of H_n, ``[len(rows), n]``."""
    m, p = hd.hadamard_factors(n)
    hm = hd.hadamard_matrix(m) * math.sqrt(m) if m > 1 else torch.ones(1, 1, dtype=torch.float64)
    j = torch.arange(n)
    return hm[rows // p][:, j // p] * sylvester_entries(rows % p, j % p) / math.sqrt(n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1536, 4096, 3584])
def test_low_precision_error_is_one_rounding(dtype, n):
    torch.manual_seed(0)
    x = torch.randn(8, n).to(dtype)
    ref = x.double() @ hd.hadamard_matrix(n)
    y = hd.fwht(x)
    assert y.dtype == dtype
    u = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
    # float32 arithmetic then one rounding to ``dtype``: |err| ≤ u·|ref| + (float32 accumulation)
    slack = 64 * 2.0**-24 * ref.abs().max()
    assert bool(((y.double() - ref).abs() <= u * ref.abs() + slack).all())


def test_dim_and_batch_shapes():
    torch.manual_seed(0)
    x = torch.randn(5, 12, 7, dtype=torch.float64)
    h = hd.hadamard_matrix(12)
    expected = torch.einsum("aib,ij->ajb", x, h)
    assert torch.allclose(hd.fwht(x, dim=1), expected, atol=1e-13)
    assert torch.allclose(hd.fwht(x, dim=-2), expected, atol=1e-13)
    xt = x.transpose(0, 2)  # non-contiguous input
    assert torch.allclose(hd.ifwht(xt, dim=1), torch.einsum("bia,ji->bja", xt, h), atol=1e-13)
    assert hd.fwht(torch.zeros(0, 16)).shape == (0, 16)


@pytest.mark.parametrize("n", [16, 20, 1536])
def test_gradients_match_dense_autograd(n):
    torch.manual_seed(n)
    h = hd.hadamard_matrix(n)
    x = torch.randn(4, n, dtype=torch.float64, requires_grad=True)
    g = torch.randn(4, n, dtype=torch.float64)
    for fn, mat in ((hd.fwht, h), (hd.ifwht, h.T)):
        (gx,) = torch.autograd.grad((fn(x) * g).sum(), x)
        (ref,) = torch.autograd.grad(((x @ mat) * g).sum(), x)
        assert torch.allclose(gx, ref, rtol=0, atol=1e-12)


def test_gradcheck():
    x = torch.randn(2, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: hd.fwht(t), (x,))
    assert torch.autograd.gradcheck(lambda t: hd.ifwht(t, dim=0), (x,))
    assert torch.autograd.gradgradcheck(lambda t: hd.fwht(t), (x,))


@pytest.mark.parametrize("n, lo, hi", [(7, 4, 8), (30, 28, 32), (90, 88, 96), (11003, 11000, 11004)])
def test_unsupported_width_names_nearest(n, lo, hi):
    assert not hd.is_supported(n)
    assert hd.nearest_supported(n) == (lo, hi)
    with pytest.raises(hd.HadamardSizeError, match=rf"nearest supported widths: {lo} and {hi}"):
        hd.hadamard_matrix(n)
    with pytest.raises(hd.HadamardSizeError, match=str(n)):
        hd.fwht(torch.zeros(2, n))


def test_supported_orders():
    orders = hd.supported_orders(100)
    assert orders[:6] == [1, 2, 4, 8, 12, 20]
    assert 36 in orders and 68 in orders  # 36 = 2(17 + 1) (Paley II), 68 = 67 + 1 (Paley I)
    assert 92 not in orders  # 91 = 7·13 and 45 are not prime powers: no Paley construction
    assert all(m in (1, 2) or m % 4 == 0 for m in orders)


# d_in / d_out widths of the supported model families (and small edge cases): m > 1 with P ≤ 32 (GEMM
# route), P > 32 (butterflies), m = 1 (power of two) and P = 1 (the dense factor alone).
SCATTER_WIDTHS = [1, 2, 12, 16, 64, 192, 576, 1536, 2048, 3072, 3584, 4096, 8192, 11008, 14336, 18944]


@pytest.mark.parametrize("n", SCATTER_WIDTHS)
def test_scatter_transform_equals_dense_float64(n):
    """``base + S·H`` / ``base + S·Hᵀ`` of a sparse ``S`` built in the transform's own layout equals the
    dense float64 product with ``hadamard_matrix``."""
    g = torch.Generator().manual_seed(n)
    rows = 3
    p = max(1, rows * n // 7)
    flat = torch.randperm(rows * n, generator=g)[:p].sort().values
    values = torch.randn(p, generator=g, dtype=torch.float64)
    base = torch.randn(rows, n, generator=g, dtype=torch.float64)
    s = torch.zeros(rows * n, dtype=torch.float64).index_put((flat,), values).view(rows, n)
    h = hd.hadamard_matrix(n)
    pos = hd.scatter_positions(flat, n)
    for inverse in (False, True):
        want = s @ (h.T if inverse else h)
        got = hd.scatter_transform(values, pos, rows, n, inverse=inverse, base=base)
        assert torch.allclose(got, base + want, atol=1e-10, rtol=0)
        got0 = hd.scatter_transform(values, pos, rows, n, inverse=inverse)
        assert torch.allclose(got0, want, atol=1e-10, rtol=0)


@pytest.mark.parametrize("n", SCATTER_WIDTHS)
def test_transform_columns_equals_dense_float64(n):
    """``Hᵀ·a`` and ``H·a`` (the transposed ``x·H`` / ``x·Hᵀ``) equal the dense float64 products."""
    g = torch.Generator().manual_seed(n + 1)
    a = torch.randn(n, 5, generator=g, dtype=torch.float64)
    h = hd.hadamard_matrix(n)
    assert torch.allclose(hd.transform_columns(a, inverse=False), h.T @ a, atol=1e-10, rtol=0)
    assert torch.allclose(hd.transform_columns(a, inverse=True), h @ a, atol=1e-10, rtol=0)
    assert torch.allclose(
        hd.transform_columns(a.T.contiguous().T, inverse=False), h.T @ a, atol=1e-10, rtol=0
    )
