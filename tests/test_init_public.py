"""The init with the project's own transforms (`qwha.transforms`, from the adapters branch)."""

import numpy as np
import pytest
import scipy.linalg
import torch

from qwha.init import dense_update, initialize, initialize_layer, output_error
from qwha.init.transform_op import RightTransform


def test_initialize_layer_with_wht_matches_scipy_hadamard():
    from qwha.transforms import transform_matrix  # adapters module; the lead merges it before this branch

    rng = np.random.default_rng(0)
    d_out, d_in = 24, 32
    d = torch.tensor(rng.standard_normal((d_out, d_in)) * 0.02)
    x = torch.tensor(rng.standard_normal((d_in, 80)))
    g = x @ x.T
    h = torch.tensor(scipy.linalg.hadamard(d_in) / np.sqrt(d_in))
    assert torch.allclose(transform_matrix("wht", d_in, dtype=torch.float64), h, atol=1e-12)

    budget = 4 * (d_in + d_out)
    idx, vals = initialize_layer(d, g, budget)
    assert idx.dtype == torch.int64 and idx.shape == (budget, 2) and vals.shape == (budget,)
    ref_idx, ref_vals = initialize_layer(d, g, budget, transform=h)
    assert torch.equal(idx, ref_idx) and torch.allclose(vals, ref_vals, atol=1e-12)
    # the unscaled update is scatter(values, indices) · H⁻¹ and it lowers the output error
    f = torch.zeros(d_out, d_in, dtype=torch.float64)
    f[idx[:, 0], idx[:, 1]] = vals
    upd = f @ h.T
    assert output_error(d, upd, g) < 0.9 * output_error(d, torch.zeros_like(d), g)
    # at full budget it is ΔW_Q itself
    idx, vals = initialize_layer(d, g, d_out * d_in)
    f = torch.zeros(d_out, d_in, dtype=torch.float64)
    f[idx[:, 0], idx[:, 1]] = vals
    assert torch.allclose(f @ h.T, d, atol=1e-10)


@pytest.mark.parametrize("kind", ["wht", "dct", "dht", "identity"])
def test_every_transform_kind_reaches_full_budget(kind):
    from qwha.transforms import transform_matrix

    rng = np.random.default_rng(1)
    d_out, d_in = 12, 24  # 24 is not a power of two: Paley ⊗ Sylvester for the WHT
    d = torch.tensor(rng.standard_normal((d_out, d_in)) * 0.02)
    x = torch.tensor(rng.standard_normal((d_in, 60)))
    out = initialize("adaalloc", d, x @ x.T, d_out * d_in, transform=kind, transform_out=kind)
    t_in = transform_matrix(kind, d_in, dtype=torch.float64)
    t_out = transform_matrix(kind, d_out, dtype=torch.float64)
    assert torch.allclose(dense_update(out, (d_out, d_in), t_in, t_out), d, atol=1e-10)


@pytest.mark.parametrize("n", [576, 1536])
def test_project_hadamard_takes_the_kronecker_path(n):
    """SmolLM2's sizes: the fast path must be found for the project's WHT (and be exact)."""
    from qwha.transforms import transform_matrix

    h = transform_matrix("wht", n, dtype=torch.float64)
    op = RightTransform.from_matrix(h)
    assert op.factors is not None
    x = torch.randn(3, n, dtype=torch.float64)
    assert torch.allclose(op.forward(x), x @ h, atol=1e-12)
    assert torch.allclose(op.inverse(x), x @ h.T, atol=1e-12)
