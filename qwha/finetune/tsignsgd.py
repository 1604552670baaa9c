"""t-SignSGD: the ternary sign optimizer of LoTA-QAF (arXiv 2505.18724).

For each parameter tensor ``p`` (ternary, values in {−1, 0, 1}) with gradient ``g``, at optimizer step
``t`` (0-based) of ``T``::

    p ← clip(p − sign(g) · 1[|g| > max(1e-9, σ_t)], −1, 1)

``σ_t`` is a per-tensor percentile of ``|g|`` chosen so that the largest ``k_t`` fraction of the entries
move: with ``n`` entries, ``m = max(1, ⌈k_t · n⌉)`` entries are kept and ``σ_t`` is the ``(m+1)``-th
largest ``|g|`` (0 when ``m ≥ n``), so exactly the top ``m`` move when there are no ties at the
threshold. The kept fraction decays linearly from ``keep_start`` (5%) at step 0 to ``keep_mid`` (0.1%)
at step ``mid_fraction · T`` (80%), then linearly to ``keep_end`` (0.01%) at the last step
(:func:`keep_fraction`). No learning rate and no moments: the only state is the step counter, kept per
parameter (like AdamW's ``step``) so that ``state_dict`` / ``load_state_dict`` resume exactly.
"""

from __future__ import annotations

import math

import torch

__all__ = ["TSignSGD", "keep_fraction", "sign_threshold"]

_FLOOR = 1e-9


def keep_fraction(
    step: int,
    total_steps: int,
    keep_start: float = 0.05,
    keep_mid: float = 0.001,
    keep_end: float = 0.0001,
    mid_fraction: float = 0.8,
) -> float:
    """The fraction of entries updated at optimizer step ``step`` (0-based) of ``total_steps``.

    Linear from ``keep_start`` at step 0 to ``keep_mid`` at ``mid_fraction · T``, then linear to
    ``keep_end`` at the last step ``T − 1`` (constant after it)."""
    t_mid = mid_fraction * total_steps
    if step <= t_mid:
        frac = step / t_mid if t_mid > 0 else 1.0
        return keep_start + (keep_mid - keep_start) * frac
    t_last = max(total_steps - 1, t_mid)
    frac = min(1.0, (step - t_mid) / (t_last - t_mid)) if t_last > t_mid else 1.0
    return keep_mid + (keep_end - keep_mid) * frac


def sign_threshold(grad: torch.Tensor, keep: float) -> torch.Tensor:
    """``σ``: the ``(m+1)``-th largest ``|g|`` with ``m = max(1, ⌈keep · n⌉)`` (0 if ``m ≥ n``)."""
    a = grad.detach().abs().reshape(-1).float()
    n = a.numel()
    m = max(1, math.ceil(keep * n))
    if m >= n:
        return torch.zeros((), dtype=a.dtype, device=a.device)
    # kthvalue(k) is the k-th smallest; the (m+1)-th largest is the (n − m)-th smallest.
    return torch.kthvalue(a.cpu() if a.device.type == "mps" else a, n - m).values.to(a.device)


class TSignSGD(torch.optim.Optimizer):
    """t-SignSGD over ternary tensors (see the module docstring).

    Args:
        params: the ternary parameters (LoTA's ``A`` and ``B``).
        total_steps: ``T``, the number of optimizer steps of the run (the schedule needs it).
        keep_start, keep_mid, keep_end, mid_fraction: the kept-fraction schedule.
    """

    uses_lr = False  # the trainer skips the learning-rate schedule for this optimizer

    def __init__(
        self,
        params,
        total_steps: int,
        keep_start: float = 0.05,
        keep_mid: float = 0.001,
        keep_end: float = 0.0001,
        mid_fraction: float = 0.8,
    ) -> None:
        if not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps={total_steps!r} must be a positive integer")
        for name, v in (("keep_start", keep_start), ("keep_mid", keep_mid), ("keep_end", keep_end)):
            if not 0 < v <= 1:
                raise ValueError(f"{name}={v!r} must be in (0, 1]")
        if not 0 < mid_fraction <= 1:
            raise ValueError(f"mid_fraction={mid_fraction!r} must be in (0, 1]")
        defaults = dict(
            total_steps=total_steps,
            keep_start=keep_start,
            keep_mid=keep_mid,
            keep_end=keep_end,
            mid_fraction=mid_fraction,
        )
        super().__init__(params, defaults)

    def keep(self, group: dict, step: int) -> float:
        return keep_fraction(
            step,
            group["total_steps"],
            group["keep_start"],
            group["keep_mid"],
            group["keep_end"],
            group["mid_fraction"],
        )

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "step" not in state:
                    state["step"] = torch.zeros((), dtype=torch.int64)
                t = int(state["step"])
                g = p.grad
                sigma = sign_threshold(g, self.keep(group, t)).clamp_min(_FLOOR)
                move = torch.sign(g) * (g.abs() > sigma.to(g.dtype))
                p.sub_(move.to(p.dtype)).clamp_(-1.0, 1.0)
                state["step"] += 1
        return loss
