"""The Kronecker fast path of RightTransform is the same product as the dense matrix."""

import numpy as np
import scipy.fft
import scipy.linalg
import torch

from qwha.init.transform_op import RightTransform


def t64(a):
    return torch.tensor(a, dtype=torch.float64)


def check(t, expect_fast):
    op = RightTransform.from_matrix(t64(t))
    assert (op.factors is not None) == expect_fast
    x = np.random.default_rng(0).standard_normal((3, 5, t.shape[0]))
    assert np.allclose(op.forward(t64(x)).numpy(), x @ t, atol=1e-12)
    assert np.allclose(op.inverse(t64(x)).numpy(), x @ t.T, atol=1e-12)
    g = x[0].T @ x[0]
    assert np.allclose(op.congruence(t64(g)).numpy(), t.T @ g @ t, atol=1e-10)


def test_sylvester_hadamard_is_split():
    check(scipy.linalg.hadamard(64) / 8.0, True)


def test_kronecker_with_a_non_power_of_two_factor():
    q, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((3, 3)))
    check(np.kron(q, scipy.linalg.hadamard(16) / 4.0), True)  # n = 48, like H_m ⊗ H_2^k
    check(np.kron(scipy.linalg.hadamard(8) / np.sqrt(8), q), True)  # the other order


def test_dense_fallback():
    check(scipy.fft.dct(np.eye(32), norm="ortho", axis=0), False)
    q, _ = np.linalg.qr(np.random.default_rng(2).standard_normal((40, 40)))
    check(q, False)
