"""Load a tuned model from Python in one call: ``model, tokenizer = qwha.load_tuned(path)``.

``path`` may be

* a cache artifact of ``init`` or ``finetune`` (``<cache>/finetune/<key>``) or its ``adapter/`` folder:
  the quantized model of the artifact's upstream ``quantize`` (found through its ``manifest.json``)
  with the adapter attached, unmerged (WHA and LoTA as qwha layers, LoRA as a ``peft.PeftModel``);
* an ``export`` artifact (``<cache>/export/<key>``) or the exported folder itself (``.../model``, or a
  copy of it anywhere), recognised by ``qwha_export.json``:

  - ``dense``: ``AutoModelForCausalLM.from_pretrained``;
  - ``gptq``: the GPTQ checkpoint through transformers + GPTQModel's torch kernel;
  - ``lota``: the merged codes through transformers, which attaches the folder's PEFT LoRA (the
    fractional zero-point shift) itself; refuses if that did not happen (PEFT missing).

The model comes back in eval mode (``trainable=True``: train mode, adapter parameters trainable; cache
artifacts only), float32 unless ``dtype`` says otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

EXPORT_INFO = "qwha_export.json"
ARTIFACT_MANIFEST = "manifest.json"

__all__ = ["EXPORT_INFO", "export_info", "load_exported", "load_tuned"]


def export_info(folder: str | Path) -> dict | None:
    """The ``qwha_export.json`` of an exported folder (or of an export artifact's ``model/``), else None."""
    folder = Path(folder)
    for cand in (folder / EXPORT_INFO, folder / "model" / EXPORT_INFO):
        if cand.is_file():
            return {**json.loads(cand.read_text()), "folder": str(cand.parent)}
    return None


def load_tuned(
    path: str | Path,
    *,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    trainable: bool = False,
    quantized: str | Path | None = None,
):
    """``(model, tokenizer)`` of a tuned model: a cache artifact (quantized model + adapter) or an export.

    Args:
        path: see the module docstring.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        dtype: compute dtype (default float32, which reproduces the stored quantized weights exactly).
        trainable: cache artifacts only: adapter parameters trainable, model in train mode.
        quantized: the quantized model folder to put the adapter on, for an adapter folder that no
            longer sits in its cache (default: found through the artifact's manifest).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    info = export_info(path)
    if info is not None:
        if trainable:
            raise ValueError(f"{path} is an export (merged weights): trainable=True needs a cache artifact")
        return load_exported(info["folder"], device=device, dtype=dtype)
    adapter_dir = path / "adapter" if (path / "adapter" / "adapter_config.json").is_file() else path
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"{path} is neither an init/finetune artifact (adapter/adapter_config.json) nor an export "
            f"({EXPORT_INFO})"
        )
    qdir = Path(quantized) if quantized is not None else _quantized_of(adapter_dir)
    from qwha.adapters import load_adapter
    from qwha.quant import load_quantized

    model = load_quantized(qdir, device=device, dtype=dtype)
    model = load_adapter(model, adapter_dir, is_trainable=trainable)
    model.train(trainable)
    return model, _tokenizer_of(qdir)


def _quantized_of(adapter_dir: Path) -> Path:
    """``<cache>/quantize/<key>/model`` for the artifact holding ``adapter_dir``, from its manifest."""
    artifact = adapter_dir.parent if adapter_dir.name == "adapter" else adapter_dir
    manifest = artifact / ARTIFACT_MANIFEST
    if not manifest.is_file():
        raise FileNotFoundError(
            f"{adapter_dir} is not inside a cache artifact (no {manifest}): "
            "pass quantized=<the quantized model folder>"
        )
    upstream = json.loads(manifest.read_text()).get("upstream", {})
    if "quantize" not in upstream:
        raise ValueError(f"{manifest} names no upstream quantize artifact")
    qdir = artifact.parent.parent / "quantize" / upstream["quantize"] / "model"
    if not qdir.is_dir():
        raise FileNotFoundError(f"the quantized model of {artifact} is not in the cache: {qdir}")
    return qdir


def _tokenizer_of(model_dir: Path):
    from qwha.models import load_tokenizer
    from qwha.quant.pipeline import NONE_MARKER

    marker = Path(model_dir) / NONE_MARKER
    source = json.loads(marker.read_text())["source"] if marker.is_file() else str(model_dir)
    return load_tokenizer(source)


def load_exported(folder: str | Path, *, device: str = "cpu", dtype: torch.dtype | None = None):
    """``(model, tokenizer)`` of an exported folder (``qwha_export.json`` names its format)."""
    folder = Path(folder)
    info = json.loads((folder / EXPORT_INFO).read_text())
    fmt = info.get("format")
    if fmt == "dense":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=dtype or torch.float32, device_map=device
        )
    elif fmt == "gptq":
        from qwha.quant import load_quantized

        model = load_quantized(folder, device=device, dtype=dtype)
    elif fmt == "lota":
        model = load_lota_export(folder, device=device, dtype=dtype)
    else:
        raise ValueError(f"{folder}/{EXPORT_INFO}: format={fmt!r} is not one of dense, gptq, lota")
    return model.eval(), _tokenizer_of(folder)


def load_lota_export(
    folder: str | Path, *, device: str = "cpu", dtype: torch.dtype | None = None
) -> nn.Module:
    """The merged LoTA export through transformers + GPTQModel's torch kernel; transformers attaches the
    folder's own PEFT LoRA (the zero-point shift). Raises if no LoRA layer came back."""
    from gptqmodel import BACKEND
    from transformers import AutoModelForCausalLM, GPTQConfig

    from qwha.quant.pipeline import eager_dequantize

    folder = Path(folder)
    saved = json.loads((folder / "config.json").read_text())["quantization_config"]
    override = GPTQConfig(bits=saved["bits"], backend=BACKEND.GPTQ_TORCH.value)
    model = AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=dtype or torch.float32, device_map=device, quantization_config=override
    )
    if not any(hasattr(m, "lora_A") for m in model.modules()):
        raise RuntimeError(
            f"{folder}: transformers did not attach the folder's LoRA (the LoTA zero-point shift); "
            "install peft, which transformers uses to load adapter_config.json"
        )
    return eager_dequantize(model).eval()
