"""Stage `init`: quantization-aware adapter initialization (docs/method.md §2) and its layer-error report.

1. Calibration Grams ``XXᵀ`` of every adapted linear from the FULL-PRECISION model over the shared
   calibration sample (float64 accumulation, shared inputs computed once, in passes bounded by
   ``init.gram_budget_gb``).
2. The quantized model gets the configured adapter; for each adapted layer ``ΔW_Q = W − W_Q`` is
   initialized by ``init.method`` (AdaAlloc + selection + refinement for QWHA, or an ablation / low-rank
   baseline).
3. Report per projection and averaged: output error ``‖ΔW_Q X − ΔW X‖`` (absolute and relative to
   ``‖ΔW_Q X‖``), normalized rank of the update, outlier coverage; plus held-out perplexity of the
   initialized model. Saved as ``report.json`` beside the adapter (PEFT format, ``adapter/``).

LoTA-QAF (``adapter=lota``, ``init=lota``) needs no calibration: its init is a ternarised Kaiming ``A``
and ``B = 0`` (the initialized model is the quantized model), so it skips steps 1-2 and reports the
trainable parameter count and the held-out perplexity.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict
from pathlib import Path

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from qwha.artifacts import ADAPTER_DIR, INIT_REPORT, MODEL_DIR, load_calibration
from qwha.stages.common import device, heldout_perplexity, heldout_text_source

log = logging.getLogger("qwha.stages.init")


def upstream(cfg: DictConfig) -> list[str]:
    if cfg.adapter.method == "lota":
        return ["base", "quantize"]
    return ["base", "calib", "quantize"]


def key_config(cfg: DictConfig) -> dict:
    # The report holds the initialized model's held-out perplexity, so its settings (and the resolved
    # held-out text) are part of the key. init.gram_budget_gb only splits the calibration forwards into
    # passes over fewer modules each (the same forwards, the same float64 sums): not keyed. LoCA's location
    # learning (adapter.loca) acts during fine-tuning: the finetune key holds it.
    p = cfg.eval.perplexity
    heldout = {"enabled": bool(p.enabled)}
    if p.enabled:
        heldout.update(
            text=heldout_text_source(cfg), window=p.window, stride=p.stride, max_tokens=p.max_tokens
        )
    init = {k: v for k, v in cfg.init.items() if k != "gram_budget_gb"}
    adapter = {k: v for k, v in cfg.adapter.items() if k != "loca"}
    # report.json records the model's and the method's names, which the tables filter and label by.
    labels = {"model": cfg.model.name, "method_name": cfg.method_name}
    return {"adapter": adapter, "init": init, "seed": cfg.seed, "heldout": heldout, "labels": labels}


# Grams of the last full-precision model and calibration sample, kept for the next init in the same
# process: a sweep over inits, refinement or bits (`make table2`, Hydra's basic launcher runs the jobs
# one after another in one process) computes them once. The Grams depend on the base model, the
# calibration sample, the targets and the dtype only (not on bits or the init), and are read-only.
_GRAM_MEMO: dict[tuple, tuple] = {}


def _memo_limit_bytes() -> float:
    return float(os.environ.get("QWHA_GRAM_MEMO_GB", "4")) * 2**30


def full_precision_grams(cfg: DictConfig, inputs: dict, targets: list[str]):
    """Yield ``({module: XXᵀ float64 [d_in, d_in]}, {module: full-precision W}, tokens)`` in chunks.

    A chunk is one decoder block when the model's blocks can run on their own (``decoder_blocks``:
    Llama, Qwen, Mistral, ...): the calibration hidden states go through the blocks one after another,
    so only one block's Grams are held while the caller initializes that block's layers. Other
    models fall back to passes over the whole model, each holding the Grams of consecutive modules
    that fit ``init.gram_budget_gb``. Inside a Hydra multirun the Grams and weights of the whole
    model are memoised for one (base, calib, targets, dtype, device) if they take at most
    ``QWHA_GRAM_MEMO_GB`` (default 4) GiB, so a sweep over inits computes them once.
    """
    memo_key = (
        inputs["base"].key,
        inputs["calib"].key,
        tuple(targets),
        str(cfg.model.dtype),
        str(device(cfg)),
    )
    if memo_key in _GRAM_MEMO:
        log.info("calibration Grams: reusing the ones computed earlier in this process")
        yield _GRAM_MEMO[memo_key]
        return
    _GRAM_MEMO.clear()
    keep = _in_sweep()
    kept_grams: dict = {}
    kept_weights: dict = {}
    n_tokens = 0
    for grams, weights, n_tokens in _compute_grams(cfg, inputs, targets):
        if keep:
            kept_grams.update(grams)
            kept_weights.update(weights)
            if not _fits_memo(kept_grams, kept_weights):
                keep, kept_grams, kept_weights = False, {}, {}
        yield grams, weights, n_tokens
    if keep:
        _GRAM_MEMO[memo_key] = (kept_grams, kept_weights, n_tokens)


def _in_sweep() -> bool:
    """Whether this process runs a Hydra multirun (where the next job may reuse the Grams)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except (ImportError, ValueError):
        return False


def _fits_memo(grams: dict, weights: dict) -> bool:
    # Shared inputs (q/k/v) share one Gram tensor: count each tensor once.
    tensors = {id(t): t for d in (grams, weights) for t in d.values()}
    return sum(t.numel() * t.element_size() for t in tensors.values()) <= _memo_limit_bytes()


def _compute_grams(cfg: DictConfig, inputs: dict, targets: list[str]):
    from qwha.init import calibration_grams
    from qwha.init.hessian import blockwise_grams, decoder_blocks, plan_gram_passes, select_target_modules
    from qwha.models import base_model_ref, load_causal_lm, torch_dtype

    dev = device(cfg)
    fp = load_causal_lm(base_model_ref(inputs["base"].path), torch_dtype(str(cfg.model.dtype), dev), dev)
    calib = load_calibration(inputs["calib"].path)
    n_tokens = int(calib.numel())
    modules = select_target_modules(fp, targets)
    batch_size = int(cfg.init.batch_size)

    def weights_of(names):
        # Views of the model's weights when it is float32 on the CPU (no copy); the caller only reads.
        return {name: modules[name].weight.detach().to("cpu", torch.float32) for name in names}

    if decoder_blocks(fp) is not None:
        log.info("calibration Grams: block by block over %d calibration tokens", n_tokens)
        for grams in blockwise_grams(fp, calib, targets, batch_size=batch_size, device=dev):
            yield grams, weights_of(grams), n_tokens
        return
    passes = plan_gram_passes(fp, targets, max_bytes=int(float(cfg.init.gram_budget_gb) * 2**30))
    for i, chunk in enumerate(passes):
        log.info("calibration Grams: pass %d/%d over %d modules", i + 1, len(passes), len(chunk))
        with torch.no_grad():
            grams = calibration_grams(fp, calib, targets, batch_size=batch_size, device=dev, modules=chunk)
        yield grams, weights_of(chunk), n_tokens
        del grams


def _quantized_model(cfg: DictConfig, inputs: dict):
    from qwha.models import torch_dtype
    from qwha.quant import load_quantized

    dev = device(cfg)
    # No dequantized-weight cache: the init reads each W_Q once and the perplexity pass scores a few
    # long windows, so the cache would only add a float32 copy of the model (0.4 GB for SmolLM2).
    model = load_quantized(
        inputs["quantize"].path / MODEL_DIR,
        device=str(dev),
        dtype=torch_dtype(str(cfg.model.dtype), dev),
        weight_cache=False,
    )
    model.qwha_base_model = str(cfg.model.id)  # recorded in adapter_config.json, not the cache path
    return model


def _rtn_quantizer(bits: int, group_size: int):
    from qwha.adapters.synthetic import rtn_grid

    return lambda w: rtn_grid(w, bits, group_size)[0].to(w.dtype)


def run(cfg: DictConfig, out: Path, inputs: dict) -> dict:
    from qwha.adapters import adapter_layers, attach_adapter, save_adapter
    from qwha.models import base_model_ref, load_tokenizer

    a, ini = cfg.adapter, cfg.init
    if a.method == "lota":
        return _run_lota(cfg, out, inputs)
    targets = list(a.target_modules)

    model = _quantized_model(cfg, inputs)
    if a.method == "wha":
        model = attach_adapter(
            model,
            method="wha",
            rank=int(a.rank),
            target_modules=targets,
            transform=str(a.transform),
            dims=int(a.dims),
            scale_norm=str(a.scale_norm),
            alpha=float(a.alpha),
            dropout=float(a.dropout),
        )
    else:
        model = attach_adapter(
            model,
            method="lora",
            rank=int(a.rank),
            target_modules=targets,
            lora_alpha=float(a.lora_alpha),
            dropout=float(a.dropout),
        )
    layers = adapter_layers(model)
    quantize_fn = _rtn_quantizer(int(cfg.quant.bits), int(cfg.quant.group_size))
    report: dict[str, dict] = {}
    gram_s = init_s = 0.0
    bar = tqdm(total=len(layers), desc=f"init {ini.method}", unit="layer")
    passes = full_precision_grams(cfg, inputs, targets)
    while True:
        t0 = time.time()
        chunk = next(passes, None)
        gram_s += time.time() - t0
        if chunk is None:
            break
        grams, weights, n_tokens = chunk
        t1 = time.time()
        for name in weights:
            report[name] = _init_layer(
                cfg, name, layers[name], weights[name], grams[name], n_tokens, quantize_fn
            )
            bar.update(1)
        init_s += time.time() - t1
        del chunk, grams, weights
    bar.close()
    if set(report) != set(layers):
        raise RuntimeError(f"init: no calibration Gram for {sorted(set(layers) - set(report))[:3]}")

    save_adapter(model, out / ADAPTER_DIR)
    tok = load_tokenizer(base_model_ref(inputs["base"].path))
    ppl = heldout_perplexity(model, tok, cfg) if cfg.eval.perplexity.enabled else None
    summary = _averages(report)
    summary["gram_s"] = round(gram_s, 2)
    summary["init_s"] = round(init_s, 2)
    if ppl is not None:
        summary["heldout_ppl"] = ppl["ppl"]
    run = {
        "model": str(cfg.model.name),
        "bits": int(cfg.quant.bits),
        "group_size": int(cfg.quant.group_size),
        "quant": str(cfg.quant.method),
        "adapter": str(a.method),
        "transform": str(a.get("transform", "")) or None,
        "init_method": str(ini.method),
        "refine": bool(ini.get("refine", False)),
        "temperature": float(ini.get("temperature", 1.0)),
        "method_name": str(cfg.method_name),
    }
    (out / INIT_REPORT).write_text(
        json.dumps(
            {"run": run, "summary": summary, "by_projection": _by_projection(report), "layers": report},
            indent=2,
        )
    )
    return {"summary": summary}


def _init_layer(
    cfg: DictConfig, name: str, layer, w: torch.Tensor, gram: torch.Tensor, n_tokens: int, quantize_fn
):
    """Initialize one adapted layer from ``ΔW_Q = W − W_Q`` and its Gram; return its report row."""
    from qwha.init import initialize, layer_error, normalized_rank, outlier_coverage

    a, ini, dev = cfg.adapter, cfg.init, device(cfg)
    w = w.to(dev)
    delta = (w - layer.base_weight().to(dev)).double()
    gram = gram.to(dev)
    if ini.kind == "sparse":
        kw = dict(
            budget=layer.budget,
            transform=str(a.transform),
            transform_out=str(a.transform) if int(a.dims) == 2 else None,
            refine=bool(ini.refine),
            temperature=float(ini.temperature),
            alloc_weight=str(ini.alloc_weight),
            score=str(ini.score),
            weight=w.double(),  # W0: ranked by init=ssh_w0
        )
    else:
        kw = dict(
            rank=layer.rank,
            loftq_iters=int(ini.get("loftq_iters", 1)),
            weight=w.double(),
            quantize_fn=quantize_fn,
        )
    res = initialize(str(ini.method), delta, gram, seed=int(cfg.seed), **kw)
    if res["kind"] == "sparse":
        layer.set_sparse(res["indices"], (res["values"] / layer.scale).float())
    else:
        layer.set_lora(res["A"].float(), (res["B"] / layer.scaling).float())
    update = layer.delta_weight().detach().double().to(dev)
    row = layer_error(delta, update, gram, n_tokens=n_tokens, weight=w.double())
    core = layer.sparse_matrix() if res["kind"] == "sparse" else update
    row["normalized_rank"] = normalized_rank(core.detach())
    row["outlier_coverage"] = outlier_coverage(delta, update)
    row["shape"] = list(delta.shape)
    return row


def _run_lota(cfg: DictConfig, out: Path, inputs: dict) -> dict:
    from qwha.adapters import attach_adapter, save_adapter
    from qwha.models import base_model_ref, load_tokenizer

    a = cfg.adapter
    t0 = time.time()
    model = _quantized_model(cfg, inputs)
    model = attach_adapter(
        model,
        method="lota",
        rank=int(a.rank),
        target_modules=list(a.target_modules),
        omega=None if a.omega is None else float(a.omega),
        seed=int(a.seed),
    )
    save_adapter(model, out / ADAPTER_DIR)
    summary: dict = {
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "init_s": round(time.time() - t0, 2),
    }
    if cfg.eval.perplexity.enabled:
        tok = load_tokenizer(base_model_ref(inputs["base"].path))
        summary["heldout_ppl"] = heldout_perplexity(model, tok, cfg)["ppl"]
    (out / INIT_REPORT).write_text(json.dumps({"summary": summary}, indent=2))
    return {"summary": summary}


_AVERAGED = ("abs", "relative", "rms", "relative_output", "normalized_rank", "outlier_coverage")


def _averages(report: dict[str, dict]) -> dict[str, float]:
    out = {}
    for key in _AVERAGED:
        vals = [row[key] for row in report.values() if key in row]
        if vals:
            out[f"layer_error_{key}" if key in ("abs", "relative", "rms", "relative_output") else key] = sum(
                vals
            ) / len(vals)
    return out


def _by_projection(report: dict[str, dict]) -> dict[str, dict[str, float]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for name, row in report.items():
        groups[name.rsplit(".", 1)[-1]].append(row)
    return {proj: _averages(dict(enumerate(rows))) for proj, rows in groups.items()}
