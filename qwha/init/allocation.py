"""AdaAlloc: split a layer's parameter budget over its output channels (docs/method.md §2.2).

Channel `i` gets `p_i = ⌊p · a_i^t / Σ_j a_j^t⌋` with the importance `a_i = ‖(ΔW_Q X)_i‖` (paper,
`alloc_weight="activation"`) or `a_i = ‖(ΔW_Q)_i‖` (authors' code, `alloc_weight="weight"`), then:

1. cap `p_i ≤ d_in`; the parameters cut by the cap go back evenly to the uncapped channels
   (`⌊excess / n_uncapped⌋` each, repeated while the spread pushes a channel over the cap) -- the
   authors' rule, made to terminate with every channel within the cap;
2. the remainder (`< n_uncapped`) goes one each to the channels with the smallest allocations
   (ties: lower channel index first);
3. floor: every channel ends with at least `m = min(2, ⌊p / d_out⌋, d_in)` parameters (2 keeps
   `F` full rank, docs/method.md §2), taken from the largest allocations by lowering them to a common level.

`Σ p_i = p` exactly and `0 ≤ p_i ≤ d_in`. All steps are vectorised over channels; the loops run
over rounds of the cap/spread and over bisection steps, not over channels.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["adaalloc", "channel_importance", "ALLOC_WEIGHTS"]

ALLOC_WEIGHTS = ("activation", "weight")


def channel_importance(
    delta_w: Tensor,
    kind: str,
    *,
    gram: Tensor | None = None,
    damped_products: tuple[Tensor, Tensor, float] | None = None,
) -> Tensor:
    """Per-output-channel importance `a [d_out]` (float64) for AdaAlloc.

    Args:
        delta_w: `ΔW_Q [d_out, d_in]`.
        kind: "activation" (`‖(ΔW_Q X)_i‖ = sqrt(ΔW_Q_i G ΔW_Q_iᵀ)`) or "weight" (`‖(ΔW_Q)_i‖`).
        gram: raw `G = X Xᵀ [d_in, d_in]` (needed for "activation" unless `damped_products`).
        damped_products: `(coeffs, Y, λ)` with `coeffs = ΔW_Q T`, `Y = ΔW_Q G_d T`; then
            `ΔW_Q_i G ΔW_Q_iᵀ = <Y_i, coeffs_i> − λ ‖coeffs_i‖²` exactly (no extra `d_out·d_in²` product).
    """
    if kind not in ALLOC_WEIGHTS:
        raise ValueError(f"alloc_weight: got {kind!r}, allowed: {', '.join(ALLOC_WEIGHTS)}")
    d = delta_w.to(torch.float64)
    if kind == "weight":
        return d.norm(dim=1)
    if damped_products is not None:
        coeffs, y, lam = damped_products
        sq = (y * coeffs).sum(dim=1) - lam * (coeffs * coeffs).sum(dim=1)
    elif gram is not None:
        sq = ((d @ gram.to(torch.float64)) * d).sum(dim=1)
    else:
        raise ValueError("xtx: alloc_weight='activation' needs the calibration Gram")
    return sq.clamp_min(0.0).sqrt()


def _lower_top(alloc: Tensor, need: int, floor: int) -> Tensor:
    """Take `need` units from the largest entries of `alloc`, never below `floor`.

    Finds the integer level `L ≥ floor` with `S(L) = Σ max(0, alloc − L) ≥ need > S(L + 1)`, cuts
    everything to `L + 1`, and takes the last `need − S(L + 1)` units one each from the channels at
    `L + 1` (largest original allocation first, then lower index).
    """
    if need <= 0:
        return alloc

    def taken(level: int) -> int:
        return int((alloc - level).clamp_min(0).sum())

    lo, hi = floor, int(alloc.max())  # taken(lo) >= need (caller guarantees), taken(hi) = 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if taken(mid) >= need:
            lo = mid
        else:
            hi = mid
    level = lo + 1
    out = alloc.clamp_max(level)
    rest = need - taken(level)
    if rest > 0:
        at_level = torch.nonzero(alloc >= level).flatten()
        order = torch.sort(alloc[at_level], descending=True, stable=True).indices
        out[at_level[order[:rest]]] -= 1
    return out


def adaalloc(importance: Tensor, budget: int, d_in: int, *, temperature: float = 1.0) -> Tensor:
    """Per-channel budgets `p [d_out]` (int64) with `Σ p = budget`, `p_i ≤ d_in` (see module doc).

    Args:
        importance: `a [d_out]`, non-negative (e.g. from `channel_importance`).
        budget: total parameters `p`, `1 ≤ p ≤ d_out·d_in`.
        d_in: the cap per channel.
        temperature: `t` in `a^t` (docs/method.md: 1; 0 gives a uniform split).
    """
    d_out = importance.shape[0]
    if not 1 <= budget <= d_out * d_in:
        raise ValueError(f"budget: must be in [1, d_out·d_in = {d_out * d_in}], got {budget}")
    if temperature < 0:
        raise ValueError(f"temperature: must be >= 0, got {temperature}")
    a = importance.detach().to(torch.float64).cpu()
    if (a < 0).any() or not torch.isfinite(a).all():
        raise ValueError("importance: must be finite and non-negative")
    w = a.pow(temperature) if temperature > 0 else torch.ones_like(a)
    if not w.sum() > 0:
        w = torch.ones_like(a)
    w = w / w.sum()
    alloc = torch.floor(budget * w).to(torch.int64)
    cap = d_in
    while True:
        alloc = alloc.clamp_max(cap)
        free = alloc < cap
        rem = budget - int(alloc.sum())
        n_free = int(free.sum())
        if rem <= 0 or n_free == 0 or rem < n_free:
            break
        alloc[free] += rem // n_free
    rem = budget - int(alloc.sum())
    if rem > 0:
        free_idx = torch.nonzero(alloc < cap).flatten()
        order = torch.sort(alloc[free_idx], stable=True).indices
        alloc[free_idx[order[:rem]]] += 1
    floor = min(2, budget // d_out, d_in)
    short = alloc < floor
    if short.any():
        need = int((floor - alloc[short]).sum())
        alloc[short] = floor
        alloc = _lower_top(alloc, need, floor)
    return alloc.to(importance.device)
