"""Save and load adapters in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

LoRA goes through PEFT (``PeftModel.save_pretrained`` / ``PeftModel.from_pretrained``). WHA is written
in the same layout by this module (why PEFT cannot host it unpatched: :mod:`qwha.adapters`):

* ``adapter_config.json``: ``{"peft_type": "WHA", "task_type": "CAUSAL_LM",
  "base_model_name_or_path": ..., "r", "target_modules", "transform", "dims", "scale_norm", "alpha",
  "dropout", "compute", "qwha_format": 1}``;
* ``adapter_model.safetensors``: for each adapted module ``<name>`` of the transformers model,
  ``base_model.model.<name>.wha_c`` (float32 ``[p]``) and ``base_model.model.<name>.wha_indices``
  (int32 ``[p]``, flat row-major positions ``row · d_in + col``, ascending).

LoTA-QAF (:mod:`qwha.adapters.lota`) is written the same way with ``peft_type: "LOTA"`` and the fields of
``LoTAConfig`` (``r``, ``omega``, ``target_modules``, ``seed``), and tensors
``base_model.model.<name>.lota_A``
(int8 ``[d_in, r]``) and ``...lota_B`` (int8 ``[r, d_out]``): the factors are ternary, so int8 is exact.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from qwha.adapters.base import is_peft_model, unwrap_model
from qwha.adapters.lota import LoTAConfig, LoTALinear, attach_lota
from qwha.adapters.wha import WHAConfig, WHALinear, attach_wha

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_FORMAT_VERSION = 1
# Attribute of the transformers model naming its base model's hub id (set by the stages' model loader).
BASE_MODEL_ATTR = "qwha_base_model"

__all__ = [
    "BASE_MODEL_ATTR",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "base_model_id",
    "load_adapter",
    "read_adapter_config",
    "save_adapter",
]


def read_adapter_config(adapter_dir: str | Path) -> dict:
    path = Path(adapter_dir) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {adapter_dir}")
    return json.loads(path.read_text())


def base_model_id(model: nn.Module) -> str | None:
    """What an adapter's ``base_model_name_or_path`` records: the hub id the stages attach as
    ``qwha_base_model`` (the quantized model's own ``_name_or_path`` is a cache folder), else that."""
    inner = unwrap_model(model)
    recorded = getattr(inner, BASE_MODEL_ATTR, None)
    return recorded or getattr(getattr(inner, "config", None), "_name_or_path", None) or None


def save_adapter(model: nn.Module, out_dir: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write the adapter of ``model`` (a PEFT LoRA model or a model carrying WHA layers) to ``out_dir``.

    ``base_model_name_or_path`` (default :func:`base_model_id`) goes into ``adapter_config.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name_or_path = base_model_name_or_path or base_model_id(model)
    if is_peft_model(model):
        for cfg in model.peft_config.values():
            cfg.base_model_name_or_path = name_or_path
        model.save_pretrained(str(out))
        return out
    inner = unwrap_model(model)
    config: WHAConfig | LoTAConfig | None = getattr(inner, "qwha_adapter_config", None)
    kind = LoTALinear if isinstance(config, LoTAConfig) else WHALinear
    layers = {n: m for n, m in inner.named_modules() if isinstance(m, kind)}
    if not layers or config is None:
        raise ValueError("the model carries no adapter (attach_adapter first)")
    tensors = {}
    for name, layer in layers.items():
        if kind is LoTALinear:
            for t in ("lota_A", "lota_B"):
                tensors[f"{_PREFIX}{name}.{t}"] = (
                    getattr(layer, t).detach().to("cpu", torch.int8).contiguous()
                )
            continue
        tensors[f"{_PREFIX}{name}.wha_c"] = layer.wha_c.detach().to("cpu", torch.float32).contiguous()
        tensors[f"{_PREFIX}{name}.wha_indices"] = (
            layer.wha_indices.detach().to("cpu", torch.int32).contiguous()
        )
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    doc = {
        "peft_type": "LOTA" if kind is LoTALinear else "WHA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": name_or_path,
        "inference_mode": True,
        **config.to_dict(),
        "qwha_format": _FORMAT_VERSION,
    }
    (out / CONFIG_NAME).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return out


def load_adapter(base_model: nn.Module, adapter_dir: str | Path, is_trainable: bool = False) -> nn.Module:
    """Attach the adapter saved in ``adapter_dir`` to ``base_model`` (a model without adapter).

    Returns what ``attach_adapter`` would: the model itself for WHA, a ``PeftModel`` for LoRA."""
    doc = read_adapter_config(adapter_dir)
    peft_type = doc.get("peft_type")
    if peft_type == "LORA":
        from peft import PeftModel

        return PeftModel.from_pretrained(
            unwrap_model(base_model), str(adapter_dir), is_trainable=is_trainable
        )
    if peft_type not in ("WHA", "LOTA"):
        raise ValueError(f"{adapter_dir}: peft_type={peft_type!r} is not one of LORA, WHA, LOTA")
    if doc.get("qwha_format") != _FORMAT_VERSION:
        raise ValueError(
            f"{adapter_dir}: qwha_format={doc.get('qwha_format')!r}, this code reads {_FORMAT_VERSION}"
        )
    if peft_type == "LOTA":
        return _load_lota(base_model, adapter_dir, doc, is_trainable)
    fields = {k: doc[k] for k in WHAConfig.__dataclass_fields__}
    config = WHAConfig(**fields)
    state = load_file(str(Path(adapter_dir) / WEIGHTS_NAME))
    budgets = {k[len(_PREFIX) : -len(".wha_c")]: v.shape[0] for k, v in state.items() if k.endswith(".wha_c")}
    attach_wha(base_model, config, budgets=_BudgetTable(budgets, adapter_dir))
    layers = {n: m for n, m in unwrap_model(base_model).named_modules() if isinstance(m, WHALinear)}
    if set(layers) != set(budgets):
        missing, extra = sorted(set(layers) - set(budgets)), sorted(set(budgets) - set(layers))
        raise ValueError(
            f"{adapter_dir} does not fit the model: layers without saved values {missing[:5]}, "
            f"saved values for no layer {extra[:5]}"
        )
    with torch.no_grad():
        for name, layer in layers.items():
            layer.wha_indices.copy_(state[f"{_PREFIX}{name}.wha_indices"].to(layer.wha_indices.device))
            layer.wha_c.copy_(state[f"{_PREFIX}{name}.wha_c"].to(layer.wha_c))
            layer.wha_c.requires_grad_(is_trainable)
    return base_model


class _BudgetTable(dict):
    """Budgets by layer name; a layer the file does not know fails with the file's name."""

    def __init__(self, budgets: dict[str, int], where) -> None:
        super().__init__(budgets)
        self.where = where

    def __missing__(self, name: str) -> int:
        raise ValueError(f"{self.where} has no values for layer {name!r} that its target_modules select")


def _load_lota(base_model: nn.Module, adapter_dir, doc: dict, is_trainable: bool) -> nn.Module:
    config = LoTAConfig(**{k: doc[k] for k in LoTAConfig.__dataclass_fields__})
    state = load_file(str(Path(adapter_dir) / WEIGHTS_NAME))
    attach_lota(base_model, config)
    layers = {n: m for n, m in unwrap_model(base_model).named_modules() if isinstance(m, LoTALinear)}
    saved = {k[len(_PREFIX) : -len(".lota_A")] for k in state if k.endswith(".lota_A")}
    if set(layers) != saved:
        missing, extra = sorted(set(layers) - saved), sorted(saved - set(layers))
        raise ValueError(
            f"{adapter_dir} does not fit the model: layers without saved factors {missing[:5]}, "
            f"saved factors for no layer {extra[:5]}"
        )
    with torch.no_grad():
        for name, layer in layers.items():
            for t in ("lota_A", "lota_B"):
                param = getattr(layer, t)
                param.copy_(state[f"{_PREFIX}{name}.{t}"].to(param))
                param.requires_grad_(is_trainable)
    return base_model
