"""LoRA for the low-rank baselines (QLoRA zero init, CLoQ, LoftQ), through PEFT itself.

``attach_lora`` is ``peft.get_peft_model`` with a ``LoraConfig``; PEFT dispatches GPTQModel layers
to its ``GPTQLoraLinear`` and plain linears to ``lora.Linear``, and saves/loads in its own format.
``LoraLayerView`` gives the init stage the same small interface a :class:`~qwha.adapters.wha.WHALinear`
has (``base_weight()``, ``delta_weight()``, ``set_lora(A, B)``) without subclassing PEFT's layers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from qwha.adapters.base import dense_weight, iter_target_linears

__all__ = ["LoraLayerView", "attach_lora", "lora_layers"]


def attach_lora(
    model: nn.Module,
    *,
    rank: int,
    target_modules: str | Sequence[str],
    lora_alpha: float | None = None,
    dropout: float = 0.0,
):
    """Wrap ``model`` in a ``peft.PeftModel`` with rank-``rank`` LoRA on ``target_modules``.

    ``lora_alpha`` defaults to ``rank`` (scaling 1). PEFT's default init: ``A`` Kaiming-uniform,
    ``B = 0`` (QLoRA); calibrated inits overwrite both with ``set_lora``."""
    from peft import LoraConfig, get_peft_model

    # Fail fast, with our message, on a target that is not a linear (PEFT would say "not supported").
    list(iter_target_linears(model, target_modules))
    config = LoraConfig(
        r=rank,
        lora_alpha=float(rank if lora_alpha is None else lora_alpha),
        lora_dropout=dropout,
        target_modules=list(target_modules) if not isinstance(target_modules, str) else target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


class LoraLayerView:
    """The init-stage interface of one PEFT LoRA layer (adapter ``adapter_name``)."""

    method = "lora"

    def __init__(self, module: nn.Module, adapter_name: str = "default") -> None:
        self.module = module
        self.adapter_name = adapter_name
        base = module.get_base_layer()
        self.in_features, self.out_features = int(base.in_features), int(base.out_features)

    @property
    def lora_A(self) -> nn.Linear:
        return self.module.lora_A[self.adapter_name]

    @property
    def lora_B(self) -> nn.Linear:
        return self.module.lora_B[self.adapter_name]

    @property
    def rank(self) -> int:
        return int(self.module.r[self.adapter_name])

    @property
    def scaling(self) -> float:
        return float(self.module.scaling[self.adapter_name])

    def base_weight(self) -> torch.Tensor:
        """Dequantized base weight ``[d_out, d_in]``, float32 (float64 for a float64 base)."""
        with torch.no_grad():
            w = dense_weight(self.module.get_base_layer()).detach()
            return w.to(torch.float64 if w.dtype == torch.float64 else torch.float32)

    @torch.no_grad()
    def set_lora(self, A: torch.Tensor, B: torch.Tensor) -> None:
        """Set ``A`` ``[r, d_in]`` and ``B`` ``[d_out, r]``; the update is ``scaling · B @ A``."""
        r = self.rank
        if A.shape != (r, self.in_features) or B.shape != (self.out_features, r):
            raise ValueError(
                f"set_lora needs A [{r}, {self.in_features}] and B [{self.out_features}, {r}], "
                f"got {tuple(A.shape)} and {tuple(B.shape)}"
            )
        self.lora_A.weight.copy_(A.to(self.lora_A.weight))
        self.lora_B.weight.copy_(B.to(self.lora_B.weight))

    def delta_weight(self) -> torch.Tensor:
        """``scaling · B @ A`` ``[d_out, d_in]`` in the adapter's dtype."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    def __repr__(self) -> str:
        return (
            f"LoraLayerView({self.out_features}×{self.in_features}, r={self.rank}, scaling={self.scaling:g})"
        )


def lora_layers(peft_model: nn.Module, adapter_name: str = "default") -> dict[str, LoraLayerView]:
    """Views of the LoRA layers, keyed by their names in the wrapped (un-adapted) model."""
    from peft.tuners.lora import LoraLayer

    inner = peft_model.get_base_model()
    return {
        name: LoraLayerView(module, adapter_name)
        for name, module in inner.named_modules()
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A
    }
