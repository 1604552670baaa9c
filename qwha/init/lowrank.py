"""Low-rank baselines: LoRA zero init (QLoRA), CLoQ, LoftQ. All return `ΔW = B @ A` unscaled.

- `lora_zero`: `B = 0`, `A` drawn like PEFT's default LoRA init (`kaiming_uniform_(a=√5)`, i.e.
  `U(−1/√d_in, 1/√d_in)`), seeded. The update is zero.
- `cloq` (Deng et al., 2025, calibrated closed form): the best rank-`r` `BA` for the calibrated
  objective `min ‖(ΔW_Q − BA) R‖_F`, `R Rᵀ = G_d` (docs/method.md's damping). With the SVD
  `ΔW_Q R = U S Vᵀ`, `BA = U_r S_r V_rᵀ R⁻¹`; the product does not depend on which factor `R` is
  used, so `R` is the Cholesky factor. Split: `B = U_r S_r^{1/2}`, `A = S_r^{1/2} V_rᵀ R⁻¹`.
- `loftq` (Li et al., 2023, data-free): alternate `Q_t = quantize(W − B_{t−1}A_{t−1})` and
  `B_t A_t = SVD_r(W − Q_t)`. Step 1 uses the quantized weight we are given (`Q_1 = W_Q`), so one
  step is the truncated SVD of `ΔW_Q` and needs neither `W` nor a quantizer. Later steps call
  `quantize_fn` (the caller passes an RTN quantizer of the same bits / group size) and change the
  quantized base weight: the result then also carries `weight_q = Q_T`, which the caller must use
  as the new base. Split: `B = U_r S_r^{1/2}`, `A = S_r^{1/2} V_rᵀ` (LoftQ's).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from qwha.init.hessian import gram_factor

__all__ = ["lora_zero", "cloq", "loftq", "truncated_svd_factors"]


def _check_rank(rank: int, d_out: int, d_in: int) -> None:
    if not 1 <= rank <= min(d_out, d_in):
        raise ValueError(f"rank: must be in [1, min(d_out, d_in) = {min(d_out, d_in)}], got {rank}")


def truncated_svd_factors(m: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Balanced rank-`r` factors of `m [d_out, n]`: `(B [d_out, r], A [r, n])`, `B A = SVD_r(m)`."""
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root.unsqueeze(1) * vh[:rank]


def lora_zero(d_out: int, d_in: int, rank: int, *, seed: int = 0) -> tuple[Tensor, Tensor]:
    """QLoRA's init: `A [r, d_in] ~ U(−1/√d_in, 1/√d_in)` (seeded), `B [d_out, r] = 0`. Returns `(A, B)`."""
    _check_rank(rank, d_out, d_in)
    gen = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(d_in)
    a = (torch.rand(rank, d_in, generator=gen, dtype=torch.float64) * 2.0 - 1.0) * bound
    return a, torch.zeros(d_out, rank, dtype=torch.float64)


def cloq(delta_w: Tensor, damped: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """CLoQ: rank-`r` minimiser of `‖(ΔW_Q − BA) R‖_F`, `R Rᵀ = G_d`. Returns `(A [r, d_in], B [d_out, r])`.

    Args:
        delta_w: `ΔW_Q [d_out, d_in]`.
        damped: the damped Gram `G_d [d_in, d_in]` float64 (`qwha.init.hessian.damped_gram`).
        rank: `r`.
    """
    d_out, d_in = delta_w.shape
    _check_rank(rank, d_out, d_in)
    d = delta_w.to(torch.float64)
    r = gram_factor(damped)
    b, a_r = truncated_svd_factors(d @ r, rank)
    # A = A_R · R⁻¹  ⇔  Rᵀ Aᵀ = A_Rᵀ  (triangular when R is the Cholesky factor).
    if torch.equal(r, r.tril()):
        a = torch.linalg.solve_triangular(r.transpose(0, 1), a_r.transpose(0, 1), upper=True).transpose(0, 1)
    else:
        a = a_r @ torch.linalg.pinv(r)
    return a, b


def loftq(
    delta_w: Tensor,
    rank: int,
    *,
    iters: int = 1,
    weight: Tensor | None = None,
    quantize_fn: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """LoftQ with `iters` alternating steps. Returns `(A [r, d_in], B [d_out, r], weight_q or None)`.

    Args:
        delta_w: `ΔW_Q = W − W_Q [d_out, d_in]` of the quantized weight we start from.
        rank: `r`.
        iters: alternating steps `T ≥ 1`; with 1, `BA = SVD_r(ΔW_Q)` and `weight_q` is None.
        weight: the full-precision `W` (needed when `iters > 1`).
        quantize_fn: `W ↦ W_Q` dequantized (needed when `iters > 1`).
    """
    d_out, d_in = delta_w.shape
    _check_rank(rank, d_out, d_in)
    if iters < 1:
        raise ValueError(f"loftq_iters: must be >= 1, got {iters}")
    b, a = truncated_svd_factors(delta_w.to(torch.float64), rank)
    if iters == 1:
        return a, b, None
    if weight is None or quantize_fn is None:
        raise ValueError("loftq_iters: > 1 needs `weight` (full precision) and `quantize_fn`")
    w = weight.to(torch.float64)
    q = None
    for _ in range(iters - 1):
        q = quantize_fn((w - b @ a).to(weight.dtype)).to(torch.float64)
        b, a = truncated_svd_factors(w - q, rank)
    return a, b, q
