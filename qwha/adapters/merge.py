"""Merge an adapter into a dense floating-point model (the ``merge_and_unload``-style export).

Every adapted layer becomes ``nn.Linear`` with weight ``W_Q + ΔW`` (LoTA: its effective weight),
computed in float32 and rounded once to ``dtype``; every other quantized linear becomes ``nn.Linear``
with its dequantized weight; the rest of the model is cast to ``dtype`` and the quantization entries
are dropped from its config, so ``save_pretrained`` writes a plain checkpoint that
``AutoModelForCausalLM.from_pretrained`` loads.
"""

from __future__ import annotations

import torch
from torch import nn

from qwha.adapters.base import base_bias, dense_weight, is_peft_model, is_quantized_linear, unwrap_model
from qwha.adapters.lota import LoTALinear
from qwha.adapters.wha import WHALinear

__all__ = ["merge_to_dense"]


def _lora_delta(module: nn.Module) -> torch.Tensor | None:
    delta = None
    for name in module.active_adapters:
        if name not in module.lora_A or name in getattr(module, "merged_adapters", []):
            continue
        a = module.lora_A[name].weight.float()
        b = module.lora_B[name].weight.float()
        d = module.scaling[name] * (b @ a)
        delta = d if delta is None else delta + d
    return delta


def _dense_linear(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Linear:
    out_f, in_f = weight.shape
    lin = nn.Linear(in_f, out_f, bias=bias is not None, device=weight.device, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    lin.requires_grad_(False)
    return lin


def _cast_saved_state(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast parameters and persistent float buffers; non-persistent buffers (rotary ``inv_freq``) keep
    the dtype a fresh ``from_pretrained`` gives them, so the export reloads to identical outputs."""
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if param.is_floating_point():
                param.data = param.data.to(dtype)
        for name, buf in module.named_buffers(recurse=False):
            if buf.is_floating_point() and name not in module._non_persistent_buffers_set:
                setattr(module, name, buf.to(dtype))


@torch.no_grad()
def merge_to_dense(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Return the transformers model with adapters merged into plain ``nn.Linear`` weights (in place)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover
        LoraLayer = ()  # noqa: N806
    inner = unwrap_model(model) if not is_peft_model(model) else model.get_base_model()
    replacements = []
    for name, module in inner.named_modules():
        if isinstance(module, WHALinear):
            base = module.base_layer
            w = dense_weight(base).float() + module.delta_weight().float()
        elif isinstance(module, LoTALinear):  # (the lossless merge into the quantized model: lota_merge)
            base = module.base_layer
            w = module.effective_weight(torch.float32)
        elif LoraLayer and isinstance(module, LoraLayer):
            base = module.get_base_layer()
            w = dense_weight(base).float()
            delta = _lora_delta(module)
            if delta is not None:
                w = w + delta.to(w.device)
        elif is_quantized_linear(module):
            base = module
            w = dense_weight(module).float()
        else:
            continue
        replacements.append((name, _dense_linear(w, base_bias(base), dtype)))
    # Outermost first; an inner module of a replaced one (a LoRA layer's base) is skipped.
    done: list[str] = []
    for name, new in replacements:
        if any(name.startswith(d + ".") for d in done):
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = inner.get_submodule(parent_name) if parent_name else inner
        setattr(parent, attr, new)
        done.append(name)
    _cast_saved_state(inner, dtype)
    for attr in ("qwha_adapter_config", "peft_config"):
        inner.__dict__.pop(attr, None)
    config = getattr(inner, "config", None)
    if config is not None:
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        config.torch_dtype = dtype
        if hasattr(config, "dtype"):
            config.dtype = dtype
    if getattr(inner, "hf_quantizer", None) is not None:
        inner.hf_quantizer = None
    for attr in ("is_quantized", "quantization_method", "_is_quantized_training_enabled"):
        inner.__dict__.pop(attr, None)
    return inner
