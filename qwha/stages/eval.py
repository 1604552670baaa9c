"""Stage `eval`: CSQA (lm-eval, 0-shot), GSM8K zero-shot CoT and held-out perplexity; METHOD §5.

Evaluates the artifact named by ``eval.target`` (quantized model, initialized or fine-tuned adapter) in
memory, adapter unmerged. Which suites run follows the fine-tuning data as in the paper (Alpaca ->
CSQA, GSM8K -> GSM8K) unless ``eval.csqa.enabled`` / ``eval.gsm8k.enabled`` say otherwise. Writes
``results.json`` (metrics, per-task numbers, model, method, bits, seed, upstream keys) and the per-item
records of each suite (``records_csqa.jsonl.gz``, ``records_gsm8k.jsonl.gz``: :mod:`qwha.eval.records`).

Items: CSQA scores a seeded random sample of each task's documents (``eval.csqa.limit``,
``eval.csqa.sample_seed``), the same for every method. GSM8K leaves out the 100 test questions behind the
offline training data's templates for *every* row when that data is in use (``eval.gsm8k.exclude``), the
untuned ones included, so all rows of a table score the same questions; exact match covers the first
``eval.gsm8k.limit`` of them, the answer loss ``eval.gsm8k.answer_nll_limit`` (null: all).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from qwha.artifacts import RESULTS
from qwha.config import ConfigError
from qwha.eval.records import merge_gsm8k, records_file, write_records
from qwha.stages.common import data_source, heldout_perplexity, load_model_for

log = logging.getLogger("qwha.stages.eval")


def upstream(cfg: DictConfig) -> list[str]:
    chain = ["base", "quantize", "init", "finetune"]
    return chain[: chain.index(cfg.eval.target) + 1]


def key_config(cfg: DictConfig) -> dict:
    # `auto` switches resolve against the fine-tuning data (format, source) and the offline flag, so they
    # are keyed.
    return {
        "eval": cfg.eval,
        "data_format": cfg.data.format,
        "offline": cfg.offline,
        "gsm8k_exclude": gsm8k_exclude(cfg),
    }


def _enabled(value, fmt: str, wanted: str) -> bool:
    return fmt == wanted if value == "auto" else bool(value)


GSM8K_EXCLUDE: tuple[str, ...] = ("auto", "gsm_symbolic", "none")


def gsm8k_exclude(cfg: DictConfig) -> str:
    """Which GSM8K test questions every row leaves out: ``gsm_symbolic`` (the 100 behind reasoning-gym's
    templates) or ``none``. ``auto``: ``gsm_symbolic`` when the fine-tuning data resolves to the packaged
    source, whatever the evaluated target, so tuned and untuned rows score the same questions."""
    value = str(OmegaConf.select(cfg, "eval.gsm8k.exclude", default="auto"))
    if value not in GSM8K_EXCLUDE:
        raise ConfigError(f"eval.gsm8k.exclude={value!r}: allowed values are {', '.join(GSM8K_EXCLUDE)}")
    if value == "auto":
        return "gsm_symbolic" if data_source(str(cfg.data.source), cfg) == "packaged" else "none"
    return value


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
    files: dict[str, str] = {}
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
            sample_seed=int(OmegaConf.select(e, "csqa.sample_seed", default=1234)),
        )
        files["csqa"] = records_file("csqa")
        res["n_records"] = write_records(out / files["csqa"], res.pop("records"))
        results["csqa"] = res
        summary["csqa_avg"] = res["average"]
    if _enabled(e.gsm8k.enabled, cfg.data.format, "gsm8k"):
        from qwha.eval.gsm8k import GSM_SYMBOLIC_TEST_IDS, answer_nll, run_gsm8k

        # The packaged gsm_symbolic data holds templates of 100 test questions: every row leaves them out.
        exclude = gsm8k_exclude(cfg)
        exclude_ids = GSM_SYMBOLIC_TEST_IDS if exclude == "gsm_symbolic" else ()
        res = run_gsm8k(
            model,
            tok,
            source=source,
            limit=e.gsm8k.limit,
            batch_size=int(e.gsm8k.batch_size),
            decoding=str(e.gsm8k.decoding),
            max_new_tokens=int(e.gsm8k.max_new_tokens),
            seed=int(e.gsm8k.seed),
            exclude_ids=exclude_ids,
        )
        res["excluded_gsm_symbolic_templates"] = exclude == "gsm_symbolic"
        generations, losses = res.pop("records"), None
        if OmegaConf.select(e, "gsm8k.answer_nll", default=True):
            res["answer_nll"] = answer_nll(
                model,
                tok,
                source=source,
                limit=OmegaConf.select(e, "gsm8k.answer_nll_limit", default=None),
                batch_size=int(e.gsm8k.batch_size),
                exclude_ids=exclude_ids,
            )
            losses = res["answer_nll"].pop("records")
            summary["gsm8k_answer_ppl"] = res["answer_nll"]["ppl"]
        files["gsm8k"] = records_file("gsm8k")
        res["n_records"] = write_records(out / files["gsm8k"], merge_gsm8k(generations, losses))
        results["gsm8k"] = res
        summary["gsm8k_em"] = res["exact_match"]
        summary["gsm8k_unparsable"] = res["unparsable"]
    results["summary"] = summary
    results["records"] = files
    (out / RESULTS).write_text(json.dumps(results, indent=2, default=str))
    log.info("eval summary: %s", summary)
    return {"summary": summary}
