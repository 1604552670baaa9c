"""Stage `eval`: CSQA (lm-eval, 0-shot), GSM8K zero-shot CoT and held-out perplexity; docs/method.md §5.

Evaluates the artifact named by ``eval.target`` (quantized model, initialized or fine-tuned adapter) in
memory, adapter unmerged. Which suites run follows the fine-tuning data as in the paper (Alpaca ->
CSQA, GSM8K -> GSM8K) unless ``eval.csqa.enabled`` / ``eval.gsm8k.enabled`` say otherwise. Writes
``results.json`` (metrics, per-task numbers, model, method, bits, seed, upstream keys).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from qwha.artifacts import RESULTS
from qwha.stages.common import data_source, heldout_perplexity, load_model_for

log = logging.getLogger("qwha.stages.eval")


def upstream(cfg: DictConfig) -> list[str]:
    chain = ["base", "quantize", "init", "finetune"]
    return chain[: chain.index(cfg.eval.target) + 1]


def key_config(cfg: DictConfig) -> dict:
    # `auto` switches resolve against the fine-tuning data format and the offline flag, so they are keyed.
    key = {"eval": cfg.eval, "data_format": cfg.data.format, "offline": cfg.offline}
    if cfg.data.format == "jsonl":  # the validation split is scored: key the data and its file
        from qwha.data.jsonl import fingerprint

        key.update(data=cfg.data, data_sha256=fingerprint(cfg.data), seed=cfg.seed)
    return key


def _enabled(value, fmt: str, wanted: str) -> bool:
    return fmt == wanted if value == "auto" else bool(value)


def run(cfg: DictConfig, out: Path, inputs: dict) -> dict:
    e = cfg.eval
    model, tok = load_model_for(cfg, inputs, str(e.target))
    source = data_source(str(e.source), cfg)
    results: dict = {
        "model": cfg.model.name,
        "target": e.target,
        "quant": cfg.quant.method,
        "bits": cfg.bits,
        "group_size": cfg.group_size,
        "adapter": cfg.adapter.method if e.target != "quantize" else None,
        "transform": OmegaConf.select(cfg, "adapter.transform") if e.target != "quantize" else None,
        "init": cfg.init.method if e.target != "quantize" else None,
        "rank": cfg.rank,
        "method_name": cfg.method_name,
        "init_refine": OmegaConf.select(cfg, "init.refine"),
        "init_temperature": OmegaConf.select(cfg, "init.temperature"),
        "data": cfg.data.name,
        "seed": cfg.seed,
        "upstream": {name: art.key for name, art in inputs.items()},
    }
    summary: dict = {}
    if e.perplexity.enabled:
        ppl = heldout_perplexity(model, tok, cfg)
        results["perplexity"] = ppl
        summary["ppl"] = ppl["ppl"]
    if _enabled(e.csqa.enabled, cfg.data.format, "alpaca"):
        from qwha.eval.csqa import run_csqa

        res = run_csqa(
            model,
            tok,
            tasks=list(e.csqa.tasks),
            source=source,
            limit=e.csqa.limit,
            batch_size=int(e.csqa.batch_size),
        )
        results["csqa"] = res
        summary["csqa_avg"] = res["average"]
    if _enabled(e.gsm8k.enabled, cfg.data.format, "gsm8k"):
        from qwha.eval.gsm8k import GSM_SYMBOLIC_TEST_IDS, answer_nll, run_gsm8k

        # Models tuned on the packaged gsm_symbolic data have seen templates of 100 test questions.
        trained_on_templates = e.target == "finetune" and data_source(str(cfg.data.source), cfg) == "packaged"
        # `eval.gsm8k.exclude_templates=true` (not in the YAML; added by qwha/summary.py) scores an earlier
        # artifact on the same items as the tuned model, for a like-for-like comparison.
        if OmegaConf.select(e, "gsm8k.exclude_templates", default="auto") is True:
            trained_on_templates = True
        res = run_gsm8k(
            model,
            tok,
            source=source,
            limit=e.gsm8k.limit,
            batch_size=int(e.gsm8k.batch_size),
            decoding=str(e.gsm8k.decoding),
            max_new_tokens=int(e.gsm8k.max_new_tokens),
            seed=int(e.gsm8k.seed),
            exclude_ids=GSM_SYMBOLIC_TEST_IDS if trained_on_templates else (),
        )
        res["excluded_gsm_symbolic_templates"] = trained_on_templates
        if OmegaConf.select(e, "gsm8k.answer_nll", default=True):
            res["answer_nll"] = answer_nll(
                model,
                tok,
                source=source,
                limit=e.gsm8k.limit,
                batch_size=int(e.gsm8k.batch_size),
                exclude_ids=GSM_SYMBOLIC_TEST_IDS if trained_on_templates else (),
            )
            summary["gsm8k_answer_ppl"] = res["answer_nll"]["ppl"]
        results["gsm8k"] = res
        summary["gsm8k_em"] = res["exact_match"]
        summary["gsm8k_unparsable"] = res["unparsable"]
    if cfg.data.format == "jsonl":  # custom data: the response loss on its validation split
        from qwha.data.jsonl import response_nll, tokenized

        val = response_nll(model, tok, tokenized(cfg.data, tok, seed=int(cfg.seed), split="validation"))
        results["validation"] = val
        summary["val_response_ppl"] = val["ppl"]
    results["summary"] = summary
    (out / RESULTS).write_text(json.dumps(results, indent=2, default=str))
    from qwha.finetune.config import WandbConfig
    from qwha.finetune.tracking import log_eval

    w = cfg.train.wandb  # the same project and mode as training; eval runs are grouped with it
    run_name = f"{cfg.model.name}-{cfg.adapter.method}-{cfg.init.method}-b{cfg.bits}"
    log_eval(WandbConfig(str(w.project), w.name, str(w.mode)), run_name, results, out, str(e.target))
    log.info("eval summary: %s", summary)
    return {"summary": summary}
