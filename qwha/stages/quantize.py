"""Stage `quantize`: MagR + GPTQ (GPTQModel), GPTQ, RTN or none; docs/method.md §3.

Writes the quantized model in GPTQModel's format to ``model/`` (with the tokenizer), and reports per-layer
``‖ΔW_Q‖_F`` and ``‖ΔW_Q X‖_F`` on the calibration sample, held-out perplexity, wall time and peak memory.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from qwha.artifacts import MODEL_DIR, QUANT_INFO, load_calibration
from qwha.cache import machine_info, machine_label
from qwha.stages.common import device, heldout_perplexity, heldout_text_source

log = logging.getLogger("qwha.stages.quantize")


def upstream(cfg: DictConfig) -> list[str]:
    # RTN needs no calibration; the sample is still read to report ||dW_Q X|| like the others.
    return ["base"] if cfg.quant.method == "none" else ["base", "calib"]


# Quantizer keys that came later, left out of the key (and the record) at these values so that the key
# names the same models as before the keys existed; a record without one of them means this value.
# `cd_damp` only matters with coordinate-descent sweeps, so it goes with `cd_iters`.
OMITTED_AT = {"magr_solver": "ista", "cd_iters": 0}


def key_config(cfg: DictConfig) -> dict:
    # The model is quantized in model.dtype, and the artifact reports held-out perplexity (always computed
    # here): the perplexity settings and the resolved held-out text are part of the key.
    quant = OmegaConf.to_container(cfg.quant, resolve=True)
    for name, value in OMITTED_AT.items():
        if quant.get(name, value) == value:
            quant.pop(name, None)
            if name == "cd_iters":
                quant.pop("cd_damp", None)
    p = cfg.eval.perplexity
    return {
        "quant": quant,
        "dtype": cfg.model.dtype,
        "heldout": {
            "text": heldout_text_source(cfg),
            "window": p.window,
            "stride": p.stride,
            "max_tokens": p.max_tokens,
        },
    }


def cd_sweeps(value, bits: int) -> int:
    """``quant.cd_iters``: an integer, or ``auto`` = the authors' schedule (30 sweeps at 2 bits, else 1)."""
    if value == "auto":
        return 30 if bits == 2 else 1
    return int(value)


def run(cfg: DictConfig, out: Path, inputs: dict) -> dict:
    from qwha.models import base_model_ref, load_tokenizer, local_model_dir, torch_dtype
    from qwha.quant import load_quantized, quantize_model

    q = cfg.quant
    dev = device(cfg)
    src = local_model_dir(base_model_ref(inputs["base"].path))
    calib = load_calibration(inputs["calib"].path) if "calib" in inputs else None
    # The rounding depends on the kernel set and thread count (experiments/results/quantize.md).
    where = machine_label(machine_info())
    log.info("quantize: %s, %d-bit, group %d on %s (%s)", q.method, q.bits, q.group_size, dev, where)
    from qwha.quant.magr import magr_solver

    with magr_solver(str(OmegaConf.select(q, "magr_solver", default="ista"))):
        metrics = quantize_model(
            src,
            out / MODEL_DIR,
            calib,
            method=str(q.method),
            bits=int(q.bits),
            group_size=int(q.group_size),
            damp=float(q.damp),
            magr_alpha=float(q.magr_alpha),
            magr_iters=int(q.magr_iters),
            cd_iters=cd_sweeps(q.get("cd_iters", 0), int(q.bits)),
            cd_damp=float(q.get("cd_damp", 0.75)),
            device=str(dev),
            dtype=torch_dtype(str(cfg.model.dtype), dev),
        )
    metrics["magr_solver"] = str(OmegaConf.select(q, "magr_solver", default="ista"))
    tok = load_tokenizer(str(src))
    if q.method != "none":
        tok.save_pretrained(out / MODEL_DIR)
    (out / QUANT_INFO).write_text(
        json.dumps({"method": q.method, "bits": q.bits, "group_size": q.group_size})
    )
    model = load_quantized(
        out / MODEL_DIR, device=str(dev), dtype=torch_dtype(str(cfg.model.dtype), dev), weight_cache=False
    )
    ppl = heldout_perplexity(model, tok, cfg)
    metrics["heldout_ppl"] = ppl["ppl"]
    metrics["heldout_tokens"] = ppl["tokens"]
    metrics.setdefault("summary", {})["heldout_ppl"] = ppl["ppl"]
    return metrics
