"""Adapters on (quantized) linear layers: the WHA family, LoRA, LoTA-QAF; PEFT-format save/load, merge.

Public API (what the init, finetune and eval stages call):

* ``attach_adapter(model, method=..., rank=..., target_modules=...)`` -> the model to train;
* ``adapter_layers(model)`` -> ``{name: layer}`` keyed by the names in the un-adapted transformers
  model; each layer has ``base_weight()`` and ``delta_weight()``, WHA layers ``set_sparse(E, c)``,
  LoRA layers ``set_lora(A, B)``;
* ``save_adapter(model, dir)`` / ``load_adapter(base_model, dir)`` in PEFT's format;
* ``merge_to_dense(model, dtype)`` -> a plain transformers model with ``W_Q + ΔW`` in ``nn.Linear``;
* LoTA-QAF (``method="lota"``, :mod:`qwha.adapters.lota`): ternary factors on the GPTQ grid, merged
  losslessly into the quantized model by ``merge_lota`` / ``save_merged_lota``
  (:mod:`qwha.adapters.lota_merge`).

Why WHA does not go through PEFT's own API (PEFT 0.21.2, checked): a PEFT method needs a member of the
``PeftType`` enum. ``register_peft_method`` refuses names that are not members, every member already
has a registered tuner (so a second registration under, say, ``SHIRA`` is refused too), and
``BaseTuner.inject_adapter`` looks the prefix up in ``PEFT_TYPE_TO_PREFIX_MAPPING`` by ``peft_type`` —
so hosting WHA in PEFT means adding an enum member or writing into PEFT's registries, i.e. patching
its internals. No existing member computes ``s · F · H⁻¹``: SHiRA is the sparse update without the
transform, FourierFT/WaveFT fix their own 2-D transforms and index generation. So LoRA uses PEFT
end to end (``get_peft_model``, ``save_pretrained``, ``PeftModel.from_pretrained``; a LoRA adapter
saved here loads with plain PEFT), while WHA keeps PEFT's layout and conventions without its
classes: ``adapter_config.json`` (``peft_type: "WHA"`` plus the method's fields) and
``adapter_model.safetensors`` with PEFT-style keys ``base_model.model.<module>.wha_c`` (float32
values) and ``...wha_indices`` (int32 flat row-major positions), written and read by
:mod:`qwha.adapters.io`.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from qwha.adapters.base import is_peft_model, unwrap_model
from qwha.adapters.io import load_adapter, save_adapter
from qwha.adapters.lora import LoraLayerView, attach_lora, lora_layers
from qwha.adapters.lota import LoTAConfig, LoTALinear, attach_lota
from qwha.adapters.lota_merge import merge_lota, save_merged_lota
from qwha.adapters.merge import merge_to_dense
from qwha.adapters.wha import WHAConfig, WHALinear, attach_wha, wha_budget, wha_scale

ADAPTER_METHODS = ("wha", "lora", "lota")
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

__all__ = [
    "ADAPTER_METHODS",
    "DEFAULT_TARGET_MODULES",
    "LoTAConfig",
    "LoTALinear",
    "LoraLayerView",
    "WHAConfig",
    "WHALinear",
    "adapter_layers",
    "attach_adapter",
    "attach_lota",
    "attach_wha",
    "is_peft_model",
    "load_adapter",
    "merge_lota",
    "merge_to_dense",
    "save_adapter",
    "save_merged_lota",
    "wha_budget",
    "wha_scale",
]


def attach_adapter(
    model: nn.Module,
    *,
    method: str,
    rank: int,
    target_modules: str | Sequence[str] = DEFAULT_TARGET_MODULES,
    transform: str = "wht",
    dims: int = 1,
    scale_norm: str = "reference",
    alpha: float = 4000.0,
    lora_alpha: float | None = None,
    dropout: float = 0.0,
    compute: str = "auto",
    omega: float | None = None,
    seed: int = 0,
) -> nn.Module:
    """Put an adapter on every target linear (``nn.Linear`` or GPTQModel quantized linear).

    ``method="wha"``: in place, returns ``model``; budget ``p = rank · (d_in + d_out)`` per layer
    (capped at ``d_in · d_out``), values zero at the default positions (see :mod:`qwha.adapters.wha`).
    ``method="lora"``: returns a ``peft.PeftModel`` around the transformers model (``lora_alpha``
    defaults to ``rank``). ``method="lota"``: in place, ternary ``A`` ``[d_in, rank]``, ``B = 0``, threshold
    ``omega`` (default ``0.75·rank``), ``A`` drawn with ``seed``; GPTQModel layers only. Only adapter
    parameters are trainable afterwards.
    """
    if method not in ADAPTER_METHODS:
        raise ValueError(f"method={method!r} is not one of {', '.join(ADAPTER_METHODS)}")
    if method == "lora":
        return attach_lora(
            unwrap_model(model),
            rank=rank,
            target_modules=target_modules,
            lora_alpha=lora_alpha,
            dropout=dropout,
        )
    if method == "lota":
        targets = target_modules if isinstance(target_modules, str) else list(target_modules)
        return attach_lota(model, LoTAConfig(r=rank, omega=omega, target_modules=targets, seed=seed))
    config = WHAConfig(
        r=rank,
        target_modules=target_modules if isinstance(target_modules, str) else list(target_modules),
        transform=transform,
        dims=dims,
        scale_norm=scale_norm,
        alpha=alpha,
        dropout=dropout,
        compute=compute,
    )
    return attach_wha(model, config)


def adapter_layers(model: nn.Module) -> dict[str, WHALinear | LoTALinear | LoraLayerView]:
    """``{qualified name: layer}`` for every adapted layer; names are those of the un-adapted model."""
    if is_peft_model(model):
        return lora_layers(model)
    kinds = (WHALinear, LoTALinear)
    return {n: m for n, m in unwrap_model(model).named_modules() if isinstance(m, kinds)}
