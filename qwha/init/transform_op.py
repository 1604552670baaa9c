"""Right-multiplication by an orthonormal transform, with a Kronecker fast path.

Every init computes products `x · T` and `x · Tᵀ` with the adapter's transform `T [n, n]` (forward
transform of row vectors, agreed convention). A dense product costs `n²` per row; the Hadamard
matrices of this project are Kronecker products (Sylvester ⊗ Paley), and for those
`x · (A ⊗ B) = vec(Aᵀ · X · B)` with `X` the row reshaped to `[m, b]`, which costs `n·(m + b)` per row.

`RightTransform.from_matrix(T)` looks for such a split of the explicit matrix (trying the divisor
`b` of `n` closest to `√n` first) and keeps it only if it reproduces `x · T` on random probe rows,
so the fast path is an exact re-association of the same product, never an assumption about how
`T` was built. DCT/DHT/random orthogonal matrices simply fall back to the dense product.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["RightTransform"]


def _divisors_near_sqrt(n: int) -> list[int]:
    divs = [b for b in range(2, n) if n % b == 0]
    return sorted(divs, key=lambda b: (abs(math.log(b) - 0.5 * math.log(n)), b))


class RightTransform:
    """The map `x ↦ x · T` (and `x ↦ x · Tᵀ`) on the last dimension of `x`.

    Attributes:
        matrix: the explicit `T [n, n]`.
        factors: `(A [m, m], B [b, b])` with `T = A ⊗ B`, or None (dense products).
    """

    def __init__(self, matrix: Tensor, factors: tuple[Tensor, Tensor] | None = None):
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"transform: expected a square matrix [n, n], got shape {tuple(matrix.shape)}")
        self.matrix = matrix
        self.n = matrix.shape[0]
        self.factors = factors

    @classmethod
    def from_matrix(cls, matrix: Tensor, *, probe_rows: int = 4) -> RightTransform:
        """Wrap `T`, detecting a Kronecker split `T = A ⊗ B` when there is one (checked on probes)."""
        op = cls(matrix)
        n = op.n
        t00 = matrix[0, 0]
        if n < 16 or t00.abs() < 1e-12:
            return op
        gen = torch.Generator().manual_seed(0)
        probe = torch.randn(probe_rows, n, generator=gen, dtype=matrix.dtype).to(matrix.device)
        reference = probe @ matrix
        tol = 1e-10 * reference.abs().max().clamp_min(1e-300)
        for b in _divisors_near_sqrt(n):
            # If T = A ⊗ B then T[i·b + r, j·b + s] = A[i, j]·B[r, s]; take B = T[:b, :b] and
            # A = T[::b, ::b] / T[0, 0] (any scaling split works).
            cand = cls(matrix, (matrix[::b, ::b] / t00, matrix[:b, :b].clone()))
            if (cand.forward(probe) - reference).abs().max() <= tol:
                return cand
        return op

    def forward(self, x: Tensor) -> Tensor:
        """`x · T` on the last dim; `x [..., n]`."""
        if self.factors is None:
            return x @ self.matrix
        a, b = self.factors
        shape = x.shape
        y = x.reshape(-1, a.shape[0], b.shape[0])
        y = torch.matmul(a.transpose(0, 1), y @ b)
        return y.reshape(shape)

    def inverse(self, x: Tensor) -> Tensor:
        """`x · Tᵀ` on the last dim (the inverse for orthonormal `T`); `x [..., n]`."""
        if self.factors is None:
            return x @ self.matrix.transpose(0, 1)
        a, b = self.factors
        shape = x.shape
        y = x.reshape(-1, a.shape[0], b.shape[0])
        y = torch.matmul(a, y @ b.transpose(0, 1))
        return y.reshape(shape)

    def congruence(self, gram: Tensor) -> Tensor:
        """`Tᵀ · G · T` for a symmetric `G [n, n]` (the normal matrix of the refinement)."""
        gt = self.forward(gram)  # G·T
        return self.forward(gt.transpose(0, 1).contiguous())  # (Tᵀ·G)·T
