"""Where the sparse coefficients go: location selection for every sparse init (docs/method.md §2.3).

Notation: `D [d_out, d_in]` is the target (`ΔW_Q`, or `T_outᵀ ΔW_Q` for the 2-D ablation),
`T` the input transform, `G_d` the damped Gram. The dense (unconstrained, unweighted) solution is
`coeffs = D T`; the refinement's normal matrix is `M = Tᵀ G_d T` and its right-hand side
`Y = D G_d T = coeffs M`. Indices are returned as a LongTensor `[p, 2]` of (row, col) sorted
row-major (by row, then column).

Selection rules (`method` of `qwha.init.initialize`):
- `adaalloc` -- per-row budgets from AdaAlloc, then in row `i` the `p_i` largest scores, where the
  score is `|coeffs_ij|` (`score="magnitude"`, paper) or `coeffs_ij² · M_jj` (`score="energy"`,
  authors' code: `x_j² ‖B_j‖²` with `B = Tᵀ R`, whose row norms are `‖B_j‖² = (Tᵀ G_d T)_jj`).
- `magnitude` -- the `p` largest scores over the whole matrix (no per-row budget).
- `random` -- `p` locations uniformly without replacement (seeded).
- `ssh` -- SSH-style (Shen et al., 2025, "SSH: Sparse Spectrum Adaptation via Discrete Hartley
  Transformation"): half of the locations (`⌊p/2⌋`) are the largest scores of the transformed
  matrix, the other half uniformly random among the rest. SSH ranks the spectrum of the pretrained
  weight; in this quantization-aware setting the transformed matrix is, by default, the one the
  init must reproduce (`coeffs = ΔW_Q T`, `ssh_source="quant_error"`); `ssh_source="weight"` ranks
  the transformed full-precision weight `W T` instead, as SSH itself does. The paper's Table 2
  places SSH's error between random and magnitude, which is what the first reading gives.
- `loca` -- LoCA-style (Du et al., 2025, "LoCA: Location-Aware Cosine Adaptation"): LoCA learns
  2-D iDCT coefficients whose locations are chosen by the magnitude of the loss gradient with
  respect to the dense spectrum. Our init-time reading: the loss is the calibrated layer-output
  objective `L(F) = ½‖(ΔW_Q − T_out F T_inᵀ) X‖²`; at `F = 0` its gradient is
  `−T_outᵀ ΔW_Q G T_in = −Y`; keep the `p` locations of largest `|Y|` over the whole matrix. It
  differs from `magnitude` exactly by the activation weighting (`|coeffs M|` instead of
  `|coeffs|`). Use it with `transform="dct"` and a 2-D transform for LoCA's own setting.
- `zero` -- the locations of `random` (same seed); values zero (no compensation).
- `random_zero` -- the same support and zero values, named for the baselines that init this way
  (SHiRA with the identity transform, LoCA with the 2-D DCT): no quantization-aware init.
- `ssh_w0` -- SSH's own init: the support of `ssh` ranked on the transformed PRETRAINED weight
  `T_outᵀ W₀ T_in` (2-D DHT in SSH), `⌊p/2⌋` largest plus the rest uniformly random; values zero.

Without refinement the values are the dense coefficients at the support (`coeffs[S]`, the best
values for the unweighted `‖ΔW_Q − F Tᵀ‖_F`); with it, the least squares of `qwha.init.refine`.
For the 2-D ablation a "channel" is a row of `F`, i.e. a row of `T_outᵀ ΔW_Q`, not an output
channel of the layer.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "SCORES",
    "coefficient_scores",
    "select_per_channel",
    "select_global",
    "select_random",
    "select_ssh",
]

SCORES = ("magnitude", "energy")


def coefficient_scores(coeffs: Tensor, kind: str, normal_diag: Tensor | None = None) -> Tensor:
    """Selection score `[d_out, d_in]`: `|coeffs|` ("magnitude") or `coeffs² · diag(M)` ("energy")."""
    if kind not in SCORES:
        raise ValueError(f"score: got {kind!r}, allowed: {', '.join(SCORES)}")
    if kind == "magnitude":
        return coeffs.abs()
    if normal_diag is None:
        raise ValueError("xtx: score='energy' needs the calibration Gram")
    return coeffs.square() * normal_diag.unsqueeze(0)


def _flat_to_pairs(flat: Tensor, d_in: int) -> Tensor:
    flat = torch.sort(flat).values
    return torch.stack([flat // d_in, flat % d_in], dim=1)


def select_per_channel(scores: Tensor, counts: Tensor) -> Tensor:
    """Row `i` keeps its `counts[i]` largest scores; returns `[Σ counts, 2]` (row, col), row-major.

    One `topk` with `k = max(counts)` over all rows, then a mask -- no loop over rows.
    """
    d_out, d_in = scores.shape
    counts = counts.to(device=scores.device, dtype=torch.int64)
    if counts.shape != (d_out,) or (counts < 0).any() or (counts > d_in).any():
        raise ValueError(f"counts: expected [d_out={d_out}] integers in [0, d_in={d_in}]")
    kmax = int(counts.max()) if d_out else 0
    if kmax == 0:
        return torch.empty(0, 2, dtype=torch.int64, device=scores.device)
    top = torch.topk(scores, kmax, dim=1, sorted=True).indices  # [d_out, kmax]
    keep = torch.arange(kmax, device=scores.device).unsqueeze(0) < counts.unsqueeze(1)
    # Sort the kept columns of every row ascending (dropped ones get the sentinel d_in).
    cols = torch.sort(torch.where(keep, top, torch.full_like(top, d_in)), dim=1).values
    rows = torch.arange(d_out, device=scores.device).unsqueeze(1).expand_as(cols)
    valid = cols < d_in
    return torch.stack([rows[valid], cols[valid]], dim=1)


def select_global(scores: Tensor, budget: int) -> Tensor:
    """The `budget` largest entries of `scores [d_out, d_in]` over the whole matrix; `[budget, 2]`."""
    d_out, d_in = scores.shape
    _check_budget(budget, d_out, d_in)
    flat = torch.topk(scores.reshape(-1), budget, sorted=False).indices
    return _flat_to_pairs(flat, d_in)


def select_random(d_out: int, d_in: int, budget: int, generator: torch.Generator, device=None) -> Tensor:
    """`budget` distinct locations drawn uniformly (seeded by `generator`, a CPU generator)."""
    _check_budget(budget, d_out, d_in)
    flat = torch.randperm(d_out * d_in, generator=generator)[:budget]
    return _flat_to_pairs(flat, d_in).to(device)


def select_ssh(scores: Tensor, budget: int, generator: torch.Generator) -> Tensor:
    """SSH-style: the `⌊budget/2⌋` largest scores, plus the rest drawn uniformly from the others."""
    d_out, d_in = scores.shape
    _check_budget(budget, d_out, d_in)
    n_top = budget // 2
    flat = scores.reshape(-1)
    top = torch.topk(flat, n_top, sorted=False).indices
    taken = torch.zeros(flat.numel(), dtype=torch.bool)
    taken[top.cpu()] = True
    others = torch.nonzero(~taken).flatten()
    pick = others[torch.randperm(others.numel(), generator=generator)[: budget - n_top]]
    return _flat_to_pairs(torch.cat([top.cpu(), pick]), d_in).to(scores.device)


def _check_budget(budget: int, d_out: int, d_in: int) -> None:
    if not 1 <= budget <= d_out * d_in:
        raise ValueError(f"budget: must be in [1, d_out·d_in = {d_out * d_in}], got {budget}")
