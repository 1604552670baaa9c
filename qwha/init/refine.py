"""Value refinement: least squares on a fixed support, batched over rows (docs/method.md §2.4).

For row `i` with support `S_i` the refinement solves `min_c ‖v − c B'‖` with `v = D_i R`,
`B = Tᵀ R` (`R Rᵀ = G_d`) and `B'` the rows of `B` in `S_i`. Its normal equations are

    (Tᵀ G_d T)[S_i, S_i] · c = (D G_d T)[i, S_i],   i.e.   M[S_i, S_i] c = Y[i, S_i],

so neither `R` nor `B` is formed. `M` is symmetric positive definite (`G_d ⪰ λI`), every principal
block too, with condition number at most `cond(G_d) ≤ (λ_max(G) + λ)/λ`; everything is float64.

Rows are grouped by their support size `k`; each group is one batched Cholesky solve on
`[n_rows, k, k]` blocks gathered from `M` (chunked to bound memory). Not LU: with torch 2.13 on CPU
(MKL), batched `torch.linalg.solve` / `lu_factor_ex` return zero pivots -- silently, `info = 0` --
once the process has called `torch.set_num_threads(n > 1)` (see `experiments/results/init.md`);
batched Cholesky is correct in every thread setting. A block whose Cholesky fails (should not
happen with the damping) is solved by `torch.linalg.lstsq` instead. The Python loop runs over the
distinct sizes and memory chunks, not over rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["refine_values", "gather_values", "row_segments"]

_CHUNK_ELEMENTS = 2**25  # float64 elements per gathered block batch (256 MiB)


def gather_values(dense: Tensor, indices: Tensor) -> Tensor:
    """`dense[indices[:, 0], indices[:, 1]]` -- values without refinement (the dense solution)."""
    return dense[indices[:, 0], indices[:, 1]]


def row_segments(indices: Tensor, d_out: int) -> tuple[Tensor, Tensor]:
    """`(counts [d_out], starts [d_out])` of a row-major sorted index list `[p, 2]`."""
    rows = indices[:, 0]
    if rows.numel() > 1 and (rows[1:] < rows[:-1]).any():
        raise ValueError("indices: must be sorted by row (row-major)")
    counts = torch.bincount(rows, minlength=d_out)
    starts = torch.cumsum(counts, 0) - counts
    return counts, starts


def refine_values(normal: Tensor, rhs: Tensor, indices: Tensor) -> Tensor:
    """Least-squares values on the support `indices`, all rows at once.

    Args:
        normal: `M = Tᵀ G_d T [d_in, d_in]` float64, symmetric positive definite.
        rhs: `Y = D G_d T [d_out, d_in]` float64.
        indices: `[p, 2]` (row, col), row-major sorted.

    Returns:
        `values [p]` float64, with `values[s]` the coefficient at `indices[s]`.
    """
    d_out = rhs.shape[0]
    counts, starts = row_segments(indices, d_out)
    cols = indices[:, 1]
    d_in = normal.shape[0]
    flat_normal = normal.reshape(-1)
    idx_dtype = torch.int32 if d_in * d_in < 2**31 else torch.int64
    values = torch.empty(indices.shape[0], dtype=rhs.dtype, device=rhs.device)
    for k in torch.unique(counts[counts > 0]).tolist():
        rows_k = torch.nonzero(counts == k).flatten()
        step = max(1, _CHUNK_ELEMENTS // (k * k))
        for lo in range(0, rows_k.numel(), step):
            rows = rows_k[lo : lo + step]
            pos = starts[rows].unsqueeze(1) + torch.arange(k, device=rhs.device)  # [n, k]
            c = cols[pos]
            # M[c_a, c_b] for all pairs of the row's columns, via one flat index_select (faster
            # than 2-D advanced indexing; int32 offsets halve the index traffic when they fit)
            c_idx = c.to(idx_dtype)
            flat = (c_idx.unsqueeze(2) * d_in + c_idx.unsqueeze(1)).reshape(-1)
            blocks = flat_normal.index_select(0, flat).view(-1, k, k)  # [n, k, k]
            b = rhs[rows.unsqueeze(1), c].unsqueeze(2)  # [n, k, 1]
            chol, info = torch.linalg.cholesky_ex(blocks)
            sol = torch.cholesky_solve(b, chol)
            bad = info != 0
            if bad.any():
                sol[bad] = torch.linalg.lstsq(blocks[bad], b[bad]).solution
            values[pos] = sol.squeeze(2)
    return values
