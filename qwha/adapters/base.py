"""What the adapters need to know about a base linear layer: nn.Linear or a GPTQModel quantized linear.

A GPTQModel layer (``gptqmodel.nn_modules.qlinear.BaseQuantLinear``, e.g. ``TorchLinear``) that has
``dequantize_weight()`` exposes its dequantized weight ``W_Q`` (GPTQModel returns it as
``[d_in, d_out]``; here it is always ``[d_out, d_in]``). Kernels without it (or with an online input
rotation, SpinQuant/QuaRot) can still carry an adapter computed beside their own forward.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator, Sequence

import torch
from torch import nn

__all__ = [
    "base_bias",
    "dense_weight",
    "has_dense_weight",
    "is_peft_model",
    "is_quantized_linear",
    "iter_target_linears",
    "linear_features",
    "unwrap_model",
]


def _quant_linear_cls() -> type | None:
    # A GPTQModel layer can only exist once GPTQModel is imported; not importing it here keeps plain
    # float models free of its ~10 s import.
    module = sys.modules.get("gptqmodel.nn_modules.qlinear")
    return getattr(module, "BaseQuantLinear", None)


def is_quantized_linear(module: nn.Module) -> bool:
    cls = _quant_linear_cls()
    return cls is not None and isinstance(module, cls)


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_quantized_linear(module)


def linear_features(module: nn.Module) -> tuple[int, int]:
    """``(d_in, d_out)`` of a linear layer."""
    return int(module.in_features), int(module.out_features)


def has_dense_weight(module: nn.Module) -> bool:
    """Whether ``dense_weight(module)`` is the layer's exact linear map (weight-side compute possible)."""
    if isinstance(module, nn.Linear):
        return True
    if not is_quantized_linear(module) or not hasattr(module, "dequantize_weight"):
        return False
    rotated = getattr(module, "online_full_had", False) or getattr(module, "online_partial_had", False)
    return not rotated and getattr(module, "adapter", None) is None


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The (dequantized) weight ``[d_out, d_in]`` of a linear layer, in the layer's own float dtype."""
    if isinstance(module, nn.Linear):
        return module.weight
    if is_quantized_linear(module) and hasattr(module, "dequantize_weight"):
        d_in = module.in_features
        g_idx = getattr(module, "g_idx", None)
        num_itr = g_idx.shape[0] // d_in if g_idx is not None else 1
        w = module.dequantize_weight(num_itr=num_itr)
        return w[:d_in, : module.out_features].T
    raise TypeError(f"{type(module).__name__} exposes no dense weight")


def base_bias(module: nn.Module) -> torch.Tensor | None:
    b = getattr(module, "bias", None)
    return b if isinstance(b, torch.Tensor) else None


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a GPTQModel wrapper or a PEFT model (else ``model`` itself)."""
    try:
        from peft import PeftModel

        if isinstance(model, PeftModel):
            model = model.get_base_model()
    except ImportError:  # pragma: no cover - peft is a dependency
        pass
    inner = model.__dict__.get("_modules", {}).get("model")
    if inner is not None and type(model).__module__.startswith("gptqmodel"):
        return inner
    return model


def matches_target(name: str, target_modules: str | Sequence[str]) -> bool:
    """PEFT's rule: a string is a regex matched against the full name; a list matches a module whose
    name equals an entry or ends with ``"." + entry``."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def iter_target_linears(
    model: nn.Module, target_modules: str | Sequence[str]
) -> Iterator[tuple[str, nn.Module, nn.Module, str]]:
    """``(qualified name, module, parent, attribute)`` for every target linear; raises if a target is
    not a supported linear or nothing matches."""
    found = False
    for name, module in list(model.named_modules()):
        if not name or not matches_target(name, target_modules):
            continue
        if not is_linear(module):
            raise TypeError(
                f"target module {name!r} is a {type(module).__name__}; adapters go on nn.Linear or a "
                "GPTQModel quantized linear"
            )
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        found = True
        yield name, module, parent, attr
    if not found:
        raise ValueError(f"target_modules={target_modules!r} matched no module of the model")


def is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PeftModel)
