"""Coordinate-descent re-rounding after GPTQ (the QWHA authors' quantizer variant).

GPTQ rounds the columns of a layer once, left to right, compensating each rounding error on the columns
not yet rounded. It never revisits a column. The QWHA authors follow it with sweeps of coordinate
descent that revisit every column on GPTQ's fixed group grid (same scales and zero-points) to lower the
layer's output error against the original weight ``W``:

    f(Ŵ) = tr((W − Ŵ) H' (W − Ŵ)ᵀ),   H' = H + λ·I,  λ = damp · mean(diag H)

with ``H`` the calibration Gram ``X Xᵀ`` of the layer input (any positive multiple: GPTQModel's
``2XᵀX/n`` works the same). With ``E = W − Ŵ``, ``f`` restricted to column ``j`` of one output row is
``H'_jj · (e − e*)² + const`` with ``e* = −Σ_{l≠j} (H'_jl / H'_jj) E_l`` (the Gram normalised by its
diagonal). The grid values of a column are equally spaced, so the nearest grid value (clamped to the code
range) to ``W_j − e*`` is the exact minimiser over the grid: a coordinate step never increases ``f``.

Columns are visited in blocks so that most of the work is matrix products: the coordinate
"gradients" ``g = E Aᵀ`` (``A = H' / diag(H')`` row-wise) of a block are computed once from the current
residual, then kept current inside the block by rank-1 updates. A sweep that changes no code is a fixed
point: later sweeps would change nothing, so the loop stops there (same result, less time).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["CDResult", "coordinate_descent", "damped_gram", "grid_codes", "output_error"]


@dataclass
class CDResult:
    """``codes`` ``[d_out, d_in]`` (int64, on the grid), ``objective``: ``f`` before the first sweep and
    after each sweep run, ``changed``: codes changed per sweep."""

    codes: torch.Tensor
    objective: list[float] = field(default_factory=list)
    changed: list[int] = field(default_factory=list)

    @property
    def sweeps(self) -> int:
        return len(self.changed)


def damped_gram(h: torch.Tensor, damp: float) -> torch.Tensor:
    """``H + damp·mean(diag H)·I`` in float64 (``h`` ``[d_in, d_in]``)."""
    h = h.double()
    lam = damp * torch.diagonal(h).mean()
    return h + lam * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)


def grid_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, g_idx: torch.Tensor, maxq: int):
    """Codes ``clamp(round(w / s + z), 0, maxq)`` of ``w`` ``[d_out, d_in]`` on the grid of ``scale`` /
    ``zero`` ``[d_out, n_groups]`` with ``g_idx`` ``[d_in]`` (group of each column)."""
    g = g_idx.long()
    return torch.clamp(torch.round(w / scale[:, g] + zero[:, g]), 0, maxq).long()


def output_error(w: torch.Tensor, w_hat: torch.Tensor, h_damped: torch.Tensor) -> float:
    """``tr((W − Ŵ) H' (W − Ŵ)ᵀ)`` in float64."""
    e = (w.double() - w_hat.double()).to(h_damped.device)
    return float(((e @ h_damped) * e).sum())


@torch.no_grad()
def coordinate_descent(
    w: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    g_idx: torch.Tensor,
    h: torch.Tensor,
    *,
    maxq: int,
    sweeps: int,
    damp: float = 0.75,
    block: int = 128,
    dtype: torch.dtype = torch.float32,
) -> CDResult:
    """Re-round ``codes`` column by column to lower ``tr((W − Ŵ) H' (W − Ŵ)ᵀ)``, ``Ŵ = (codes − z)·s``.

    Args:
        w: the original weight ``[d_out, d_in]`` (the target, not the weight GPTQ quantized).
        codes: GPTQ's integer codes ``[d_out, d_in]`` in ``[0, maxq]``.
        scale, zero: the fixed grid ``[d_out, n_groups]``; g_idx: ``[d_in]`` group index per column.
        h: calibration Gram ``[d_in, d_in]`` (any positive multiple of ``X Xᵀ``).
        maxq: ``2^bits − 1``; sweeps: at most this many passes over all columns (0: none).
        damp: ``λ / mean(diag H)``; block: columns per block; dtype: working precision of the sweeps
            (the objective is always evaluated in float64).

    Returns:
        :class:`CDResult`; ``objective`` is non-increasing (up to the working precision's rounding).
    """
    dev = w.device
    hd = damped_gram(h.to(dev), damp)
    d_out, d_in = w.shape
    g = g_idx.long().to(dev)
    s = scale.to(dev, dtype)[:, g]  # [d_out, d_in]: the grid step of every weight
    z = zero.to(dev, dtype)[:, g]
    target = w.to(dtype)
    q = codes.to(dev).long().clone()
    w_hat = (q.to(dtype) - z) * s
    result = CDResult(codes=q, objective=[output_error(w, w_hat, hd)])
    diag = torch.diagonal(hd).clone()
    live = diag > 0
    a = (hd / torch.where(live, diag, torch.ones_like(diag))[:, None]).to(dtype)  # A_jl = H'_jl / H'_jj
    for _ in range(sweeps):
        changed = 0
        for b0 in range(0, d_in, block):
            b1 = min(b0 + block, d_in)
            grad = (target - w_hat) @ a[b0:b1].T  # [d_out, B]: g_j = Σ_l E_l A_jl
            a_blk = a[b0:b1, b0:b1]  # a_blk[k, j] = A_kj
            for j in range(b1 - b0):
                col = b0 + j
                if not live[col]:
                    continue
                # The exact column minimiser Ŵ_j + g_j, rounded on the column's grid.
                new_q = torch.clamp(
                    torch.round((w_hat[:, col] + grad[:, j]) / s[:, col] + z[:, col]), 0, maxq
                )
                new_w = (new_q - z[:, col]) * s[:, col]
                delta = new_w - w_hat[:, col]
                moved = delta != 0
                if moved.any():
                    changed += int(moved.sum())
                    w_hat[:, col] = new_w
                    q[:, col] = new_q.long()
                    grad -= delta[:, None] * a_blk[:, j][None, :]  # E_col fell by delta
        result.changed.append(changed)
        result.objective.append(output_error(w, w_hat, hd))
        if changed == 0:
            break
    return result
