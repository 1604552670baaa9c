"""Layer error, normalised rank and outlier coverage against explicit computations."""

import numpy as np
import pytest
import torch

from qwha.init import layer_error, normalized_rank, outlier_coverage, output_error
from qwha.init.hessian import damped_gram, gram_factor


def t64(a):
    return torch.tensor(a, dtype=torch.float64)


def test_output_error_from_gram_equals_explicit():
    rng = np.random.default_rng(0)
    d, u, w = rng.standard_normal((3, 6, 9))
    x = rng.standard_normal((9, 25))
    g = t64(x @ x.T)
    want = np.linalg.norm((d - u) @ x)
    assert np.isclose(output_error(t64(d), t64(u), g), want, rtol=1e-12)
    rep = layer_error(t64(d), t64(u), g, n_tokens=25, weight=t64(w))
    assert np.isclose(rep["abs"], want, rtol=1e-12)
    assert np.isclose(rep["relative"], want / np.linalg.norm(d @ x), rtol=1e-12)
    assert np.isclose(rep["rms"], np.sqrt(np.mean(((d - u) @ x) ** 2)), rtol=1e-12)
    assert np.isclose(rep["relative_output"], want / np.linalg.norm(w @ x), rtol=1e-12)
    assert layer_error(t64(d), torch.zeros(6, 9), g)["relative"] == pytest.approx(1.0)


@pytest.mark.parametrize("rank", [1, 4, 6])
def test_normalized_rank_of_known_rank(rank):
    rng = np.random.default_rng(rank)
    m = rng.standard_normal((6, rank)) @ rng.standard_normal((rank, 11))
    assert normalized_rank(t64(m)) == rank / 6
    assert normalized_rank(torch.zeros(6, 11, dtype=torch.float64)) == 0.0
    # a relative tolerance above the smallest singular value drops it
    s = np.linalg.svd(m, compute_uv=False)
    assert normalized_rank(t64(m), rtol=1.01 * s[rank - 1] / s[0]) == (rank - 1) / 6


def test_outlier_coverage_hand_example():
    d = t64([[10.0, 1.0], [-1.0, 0.5], [2.0, -8.0], [0.1, 0.2]])  # 8 entries: top 25% = {10, −8}
    upd = torch.zeros_like(d)
    assert outlier_coverage(d, upd, frac=0.25) == 0.0
    assert outlier_coverage(d, d, frac=0.25) == 1.0
    upd[0, 0], upd[2, 1], upd[1, 1] = 7.0, -9.0, 100.0  # non-outlier entries do not count
    assert outlier_coverage(d, upd, frac=0.25) == pytest.approx(1 - (3.0 + 1.0) / 18.0)
    upd[0, 0] = 35.0  # overshoot: |10 − 35| + |−8 + 9| = 26 > 18, worse than nothing
    assert outlier_coverage(d, upd, frac=0.25) < 0


def test_damped_gram_matches_method_definition():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((7, 5))  # rank 5 < 7: singular Gram
    g = x @ x.T
    gd, lam = damped_gram(t64(g))
    assert np.isclose(lam, 1e-4 * np.mean(np.diag(g)))
    assert np.allclose(gd.numpy(), g + lam * np.eye(7), atol=1e-14)
    r = gram_factor(gd).numpy()
    assert np.allclose(r @ r.T, gd.numpy(), atol=1e-12)
    # an indefinite input (round-off gone wild): eigenvalues of G + λI clamped at 0
    q, _ = np.linalg.qr(rng.standard_normal((4, 4)))
    bad = (q * np.array([-5.0, 1.0, 2.0, 3.0])) @ q.T
    gd_bad, lam_bad = damped_gram(t64(bad))
    evals, evecs = np.linalg.eigh(bad + lam_bad * np.eye(4))
    assert np.allclose(gd_bad.numpy(), (evecs * np.clip(evals, 0, None)) @ evecs.T, atol=1e-12)
    with pytest.raises(ValueError, match="^xtx"):
        damped_gram(torch.zeros(3, 3))
