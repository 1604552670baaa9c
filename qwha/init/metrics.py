"""Init quality metrics (paper Tables 2, 6, 7 and its rank / outlier analyses).

All take the quantization error `ΔW_Q = W − W_Q [d_out, d_in]` and the adapter's initial update
`ΔW [d_out, d_in]` (unscaled, dense; build it with `dense_update`). Computations are float64.

Definitions
-----------
- Output error: `‖ΔW_Q X − ΔW X‖_F = sqrt(tr(E G Eᵀ))`, `E = ΔW_Q − ΔW`, with the *raw* Gram
  `G = X Xᵀ` (undamped), summed over the calibration tokens.
- Normalised variants (`layer_error`):
  `relative` = `‖E X‖ / ‖ΔW_Q X‖` -- the share of the quantization error's effect on the output
  left after init (zero init: 1); `rms` = `‖E X‖_F / sqrt(d_out · n_tokens)` -- the root mean
  square error per output entry per token, independent of the calibration size and layer width;
  `relative_output` = `‖E X‖ / ‖W X‖` when the full-precision weight is given.
  The paper's "average layer error ×1e3" (Table 2: none 7.21 ... AdaAlloc 3.86) does not say its
  normalisation; zero init there is not 1000, so it is not `relative`. We report `rms × 1e3`
  averaged over layers as its analogue (a per-entry output error of a few 1e-3 is the right order
  for 4-bit g64 weights), and print `relative` beside it, which is the scale-free comparison.
- Normalised rank: `rank(ΔW) / min(d_out, d_in)` (`rank(F) = rank(ΔW)` for orthonormal
  transforms), with singular values counted above `tol = σ_max · max(d_out, d_in) · ε_float64`
  (NumPy's `matrix_rank` default) unless `rtol` is given (`tol = rtol · σ_max`).
- Outlier coverage: `O` = the positions of the `⌈0.1 · d_out · d_in⌉` largest `|ΔW_Q|` entries
  (the quantization-error outliers, in the weight domain where they live). Coverage is the share
  of their ℓ1 mass that the update removes:
  `1 − Σ_O |ΔW_Q − ΔW| / Σ_O |ΔW_Q|` -- 1 when the outliers are reproduced exactly, 0 for zero
  init, negative when the update makes them worse. A sparse `F` in a transform domain touches
  every weight of its rows, so the definition is on `ΔW`, not on `F`'s support.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["dense_update", "output_error", "layer_error", "normalized_rank", "outlier_coverage"]


def dense_update(
    result: dict, shape: tuple[int, int], t_in: Tensor | None = None, t_out: Tensor | None = None
) -> Tensor:
    """The dense unscaled update `ΔW [d_out, d_in]` float64 of an init result.

    Args:
        result: from `qwha.init.initialize` (`kind` "sparse" or "lowrank").
        shape: `(d_out, d_in)`.
        t_in: the input transform `T [d_in, d_in]` (sparse results): `ΔW = F Tᵀ`.
        t_out: the output transform for the 2-D ablation: `ΔW = T_out F T_inᵀ`.
    """
    if result["kind"] == "lowrank":
        return result["B"].to(torch.float64) @ result["A"].to(torch.float64)
    if result["kind"] != "sparse":
        raise ValueError(f"result: kind must be sparse or lowrank, got {result['kind']!r}")
    if t_in is None:
        raise ValueError("t_in: a sparse result needs the input transform")
    idx = result["indices"]
    f = torch.zeros(shape, dtype=torch.float64, device=idx.device)
    f[idx[:, 0], idx[:, 1]] = result["values"].to(torch.float64)
    upd = f @ t_in.to(torch.float64).transpose(0, 1)
    if t_out is not None:
        upd = t_out.to(torch.float64) @ upd
    return upd


def output_error(delta_w: Tensor, update: Tensor, xtx: Tensor) -> float:
    """`‖(ΔW_Q − ΔW) X‖_F = sqrt(tr(E G Eᵀ))` with the raw Gram `G [d_in, d_in]`."""
    e = delta_w.to(torch.float64) - update.to(torch.float64)
    return math.sqrt(max(float(((e @ xtx.to(torch.float64)) * e).sum()), 0.0))


def layer_error(
    delta_w: Tensor,
    update: Tensor,
    xtx: Tensor,
    *,
    n_tokens: int | None = None,
    weight: Tensor | None = None,
) -> dict[str, float]:
    """Output error and its normalised variants (module docstring); keys present only when computable.

    Returns:
        `{"abs", "relative", "rms" (needs n_tokens), "relative_output" (needs weight)}`.
    """
    g = xtx.to(torch.float64)
    err = output_error(delta_w, update, g)
    base = output_error(delta_w, torch.zeros_like(delta_w), g)
    out = {"abs": err, "relative": err / base if base > 0 else 0.0}
    if n_tokens is not None:
        out["rms"] = err / math.sqrt(delta_w.shape[0] * n_tokens)
    if weight is not None:
        ref = output_error(weight, torch.zeros_like(weight), g)
        out["relative_output"] = err / ref if ref > 0 else float("nan")
    return out


def normalized_rank(update: Tensor, *, rtol: float | None = None) -> float:
    """`rank(ΔW) / min(d_out, d_in)` with the tolerance of the module docstring."""
    m = update.to(torch.float64)
    s = torch.linalg.svdvals(m)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0.0
    tol = float(s[0]) * (rtol if rtol is not None else max(m.shape) * torch.finfo(torch.float64).eps)
    return int((s > tol).sum()) / min(m.shape)


def outlier_coverage(delta_w: Tensor, update: Tensor, *, frac: float = 0.1) -> float:
    """Share of the ℓ1 mass of the top-`frac` `|ΔW_Q|` entries removed by the update (module doc)."""
    if not 0 < frac <= 1:
        raise ValueError(f"frac: must be in (0, 1], got {frac}")
    d = delta_w.to(torch.float64).reshape(-1)
    u = update.to(torch.float64).reshape(-1)
    k = max(1, math.ceil(frac * d.numel()))
    top = torch.topk(d.abs(), k, sorted=False).indices
    mass = float(d[top].abs().sum())
    if mass == 0.0:
        return 1.0
    return 1.0 - float((d[top] - u[top]).abs().sum()) / mass
