"""Learning-rate schedules with linear warmup (the conventions of HF's ``get_*_schedule_with_warmup``).

The factor multiplies the peak learning rate at optimizer step ``s`` (0-based, the number of updates
already made): linear warmup ``s / w`` for ``s < w`` (so the very first update has lr 0, as in HF), then
``cosine``: ``0.5 (1 + cos(pi (s - w) / (T - w))``, ``linear``: ``(T - s) / (T - w)``, ``constant``: 1.
"""

from __future__ import annotations

import math

import torch

from qwha.finetune.config import SCHEDULERS


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    """``ceil(ratio x total)``, HF TrainingArguments' rule."""
    return math.ceil(total_steps * warmup_ratio)


def lr_factor(step: int, total_steps: int, warmup: int, kind: str = "cosine") -> float:
    """Multiplier of the peak lr at optimizer step ``step`` of ``total_steps`` with ``warmup`` steps."""
    if kind not in SCHEDULERS:
        raise ValueError(f"train.scheduler={kind!r}: allowed values are {', '.join(SCHEDULERS)}")
    if step < warmup:
        return step / max(1, warmup)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total_steps - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


class NoSchedule:
    """The scheduler interface the trainer calls, for an optimizer without a learning rate (t-SignSGD):
    ``get_last_lr()`` is ``[None]`` (logged as null), stepping and state are no-ops."""

    def get_last_lr(self) -> list[None]:
        return [None]

    def step(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float, kind: str = "cosine"
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` stepping once per optimizer step."""
    w = warmup_steps(total_steps, warmup_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, w, kind))
