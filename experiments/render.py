"""Render the paper's tables from cached runs, with the published numbers beside ours.

    python experiments/render.py table3 [--model smollm2-135m] [--cache .cache/qwha] [--out DIR]
    python experiments/render.py fig_rank                       # markdown + fig_rank_<model>.png
    python experiments/render.py archive                        # cache records -> experiments/results/runs

Reads every complete `eval` artifact (`results.json`) and `init` artifact (`report.json`) in the cache,
then in the archived records of earlier runs (`--runs`, default experiments/results/runs; the cache wins
for a key both hold), keeps those of the requested model, and writes `<out>/<table>_<model>.md` (and a
PNG for the figures). A record built on another build of one of its upstream keys than the record read
for that key (a quantized model re-made on another machine: experiments/results/quantize.md) is left
out, so one table never mixes two quantized models under one key.
Runs are produced by `python -m qwha -m experiment=<table> model=<model> budget=<small|paper>`
(`make <table>` does both).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments import published  # noqa: E402
from experiments.rows import eval_label, finetune_label, regime_note, table_rank  # noqa: E402
from qwha.cache import build_id, machine_label  # noqa: E402

TABLES = ("table2", "table3", "table4", "table5", "table13", "table14")
FIGURES = ("fig_rank",)
# Tables 2/6/7 compare selections at one budget: the paper's r = 64 (other ranks belong to fig_rank).
TABLE2_RANK = 64


# The archived records of the runs behind the committed tables (`render.py archive`).
RUNS_DIR = Path(__file__).resolve().parent / "results" / "runs"
# What `archive` keeps of an artifact: its records, never its weights or calibration tensors.
RECORD_FILES = (
    "manifest.json",
    "results.json",
    "report.json",
    "metrics.jsonl",
    "quant.json",
    "base_model.json",
)
STAGES = ("base", "calib", "quantize", "init", "finetune", "eval")


class Runs:
    """Complete artifacts read from several roots in order: a stage cache, then archived records.

    An archive (``render.py archive``) holds each artifact's JSON records without its weights, so the
    tables re-render on a machine whose cache is gone. Where two roots hold a complete artifact under the
    same key (the same config and upstream), the first root's copy is read."""

    def __init__(self, *roots: Path | str):
        self.roots = [Path(r) for r in roots]

    @classmethod
    def of(cls, cache: Runs | Path | str) -> Runs:
        return cache if isinstance(cache, Runs) else cls(cache)

    def complete(self, stage: str) -> list[tuple[Path, dict]]:
        """The complete records of ``stage``, one per key, less those built on another build of an
        upstream artifact than the one these roots hold (:meth:`consistent`)."""
        found: dict[str, tuple[Path, dict]] = {}
        for root in self.roots:
            for manifest in sorted((root / stage).glob("*/manifest.json")):
                key = manifest.parent.name
                if key in found:
                    continue
                info = json.loads(manifest.read_text())
                if info.get("status") == "complete":
                    found[key] = (manifest.parent, info)
        return [found[k] for k in sorted(found) if self.consistent(found[k][1])]

    def consistent(self, info: dict, _seen: dict | None = None) -> bool:
        """Whether the record ``info`` was built on the upstream records these roots hold, all the way up.

        A manifest names the build of each upstream artifact it read (``upstream_builds``, a hash of that
        artifact's file checksums). Older manifests lack it; for them an upstream record created after the
        record itself cannot be the one it read. An upstream with no record here is not held against it."""
        seen = {} if _seen is None else _seen
        builds = info.get("upstream_builds")
        for stage, key in info.get("upstream", {}).items():
            up = self.manifest(stage, key)
            if not up:
                continue
            if builds is not None and stage in builds:
                if builds[stage] != build_id(up):
                    return False
            elif _created(up) > _created(info):
                return False
            if (stage, key) not in seen:
                seen[(stage, key)] = True  # guards the recursion; replaced by the answer below
                seen[(stage, key)] = self.consistent(up, seen)
            if not seen[(stage, key)]:
                return False
        return True

    def folder(self, stage: str, key: str) -> Path | None:
        return next((path for path, _ in self._candidates(stage, key)), None)

    def _candidates(self, stage: str, key: str):
        for root in self.roots:
            manifest = root / stage / key / "manifest.json"
            if key and manifest.exists():
                info = json.loads(manifest.read_text())
                if info.get("status") == "complete":
                    yield manifest.parent, info

    def manifest(self, stage: str, key: str) -> dict:
        return next((info for _, info in self._candidates(stage, key)), {})


def archive(cache: Runs | Path, dest: Path) -> int:
    """Copy the records (RECORD_FILES) of every complete artifact in ``cache`` to ``dest/<stage>/<key>/``;
    returns how many artifacts were copied or refreshed."""
    import shutil

    n = 0
    for stage in STAGES:
        for path, _ in Runs(cache).complete(stage):
            target = dest / stage / path.name
            target.mkdir(parents=True, exist_ok=True)
            for name in RECORD_FILES:
                if (path / name).is_file():
                    shutil.copyfile(path / name, target / name)
            n += 1
    return n


def _created(info: dict) -> float:
    """A manifest's ``created`` time as a POSIX timestamp (0 when missing or unreadable)."""
    from datetime import datetime

    try:
        return datetime.strptime(info["created"], "%Y-%m-%dT%H:%M:%S%z").timestamp()
    except (KeyError, TypeError, ValueError):
        return 0.0


def _complete(cache: Runs | Path, stage: str) -> list[tuple[Path, dict]]:
    return Runs.of(cache).complete(stage)


def eval_runs(cache: Runs | Path, model: str) -> list[dict]:
    runs = []
    for path, info in _complete(cache, "eval"):
        res = json.loads((path / "results.json").read_text())
        if res.get("model") == model:
            res["_path"] = str(path)
            res["_wall_s"] = info.get("wall_time_s")
            res["method_name"] = eval_label(res, Runs.of(cache).manifest)
            runs.append(res)
    return runs


def _manifest(cache: Runs | Path, stage: str, key: str) -> dict:
    return Runs.of(cache).manifest(stage, key)


def _model_name(base_config: dict) -> str | None:
    """The `conf/model/<name>.yaml` whose id (and source) the base artifact was built from."""
    import yaml

    for conf in sorted((Path(__file__).resolve().parent.parent / "conf" / "model").glob("*.yaml")):
        spec = yaml.safe_load(conf.read_text()) or {}
        if spec.get("id") == base_config.get("id") and spec.get("source", "hub") == base_config.get(
            "source", "hub"
        ):
            return spec.get("name", conf.stem)
    return base_config.get("id")


def _init_label(init: dict) -> str:
    name = init.get("method")
    if name == "adaalloc":
        reference = init.get("alloc_weight") == "weight" and init.get("score") == "energy"
        return "qwha_reference" if reference else "qwha"
    return {"lora_zero": "qlora", "ternary_kaiming": "lota"}.get(name, name)


def init_run_info(cache: Runs | Path, info: dict) -> dict:
    """What an init artifact was run with, from its manifest and its upstream manifests: model, bits,
    group size, quantizer, init (and refinement), adapter."""
    cfg, ups = info.get("config", {}), info.get("upstream", {})
    quant = _manifest(cache, "quantize", ups.get("quantize", "")).get("config", {}).get("quant", {})
    base = _manifest(cache, "base", ups.get("base", "")).get("config", {})
    init, adapter = cfg.get("init", {}), cfg.get("adapter", {})
    return {
        "model": _model_name(base),
        "bits": quant.get("bits"),
        "group_size": quant.get("group_size"),
        "quant": quant.get("method"),
        "init": _init_label(init),
        "refine": init.get("refine"),
        "temperature": init.get("temperature"),
        "adapter": adapter.get("method"),
        "transform": adapter.get("transform"),
        "rank": adapter.get("rank"),
    }


def init_runs(cache: Runs | Path, model: str) -> list[dict]:
    runs = []
    for path, info in _complete(cache, "init"):
        rep = json.loads((path / "report.json").read_text())
        rep["run"] = {**init_run_info(cache, info), **rep.get("run", {})}
        if rep["run"].get("model") == model and "summary" in rep:
            rep["_wall_s"] = info.get("wall_time_s")
            rep["_key"] = path.name
            runs.append(rep)
    return runs


def _method(res: dict) -> str:
    if res.get("method_name") not in (None, "custom"):
        return res["method_name"]
    if res.get("target") == "quantize":
        return "gptq_magr"
    return f"{res.get('adapter')}/{res.get('init')}"


def _run_label(run: dict) -> str | None:
    """An init run's name in the tables: its method preset (``method=``), else its init."""
    return run.get("method_name") if run.get("method_name") not in (None, "custom") else run.get("init")


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def _num(x, fmt=".2f") -> str:
    return "–" if x is None else format(x, fmt)


def _header(title: str, model: str, runs: int, note: str = "") -> list[str]:
    lines = [
        f"# {title}",
        "",
        f"Model: `{model}`; {runs} runs (cache and archived records). Published: {published.PAPER}.",
    ]
    if note:
        lines += ["", note]
    return lines + ["", regime_note(model), ""]


# Table 3's row order (the paper's, then the second method family); other labels follow alphabetically.
TABLE3_ORDER = ("gptq_magr", "qlora", "cloq", "loftq", "ssh", "loca", "qwha", "qwha_reference", "lota")


def _table3_rank(method: str) -> tuple[int, str]:
    return (TABLE3_ORDER.index(method) if method in TABLE3_ORDER else len(TABLE3_ORDER), method)


def table3(cache: Runs | Path, model: str) -> str:
    runs = eval_runs(cache, model)
    cells: dict[tuple[str, int], dict[str, float]] = defaultdict(dict)
    for r in runs:
        key = (_method(r), int(r["bits"]))
        if "csqa" in r:
            cells[key]["csqa"] = r["csqa"]["average"]
        if "gsm8k" in r:
            cells[key]["gsm8k"] = r["gsm8k"]["exact_match"]
            cells[key]["answer_ppl"] = _answer_ppl(r["gsm8k"])
    lines = _header(
        "Table 3: methods x bits (CSQA avg / GSM8K, %)",
        model,
        len(runs),
        "Paper columns: Llama-3.2-3B (and 3.1-8B 2-bit where published). lota = LoTA-QAF (arXiv "
        "2505.18724), the second method family: the QWHA paper publishes no numbers for it.",
    )
    lines += [
        "| method | bits | CSQA avg (ours) | GSM8K (ours) | GSM8K answer ppl (ours) | CSQA avg (paper 3B) "
        "| GSM8K (paper 3B) |",
        "|---|---|---|---|---|---|---|",
    ]
    for (method, bits), v in sorted(cells.items(), key=lambda kv: (-kv[0][1], *_table3_rank(kv[0][0]))):
        paper = published.TABLE3.get(("llama3.2-3b", bits), {}).get(method)
        lines.append(
            f"| {method} | {bits} | {_pct(v.get('csqa'))} | {_pct(v.get('gsm8k'))} | "
            f"{_num(v.get('answer_ppl'))} | "
            f"{_num(paper[0]) if paper else '–'} | {_num(paper[1]) if paper else '–'} |"
        )
    return "\n".join(lines) + "\n"


# The settings an ablation holds at their defaults while it sweeps another one.
ABLATION_DEFAULTS = {"temperature": 1.0, "group_size": 64}


def at_defaults(run: dict, *, but: str | None = None) -> bool:
    """The run holds every ablation setting except ``but`` at its default: group size 64 and, for an
    init that has a temperature (AdaAlloc), t = 1. Keeps Table 13's and 14's sweeps out of the others."""
    for k, v in ABLATION_DEFAULTS.items():
        if k == but:
            continue
        if k == "temperature" and run.get(k) is None:
            continue  # inits without a temperature (zero, SSH, LoCA, CLoQ, ...)
        if run.get(k) != v:
            return False
    return True


def table2(cache: Runs | Path, model: str) -> str:
    runs = [rep for rep in init_runs(cache, model) if at_defaults(rep["run"])]
    lines = _header(
        "Tables 2 / 6 / 7: layer output error, coverage and rank after init",
        model,
        len(runs),
        "Ours: mean over adapted layers of ||dW_Q X - dW X|| / ||dW_Q X|| (relative), the outlier "
        "coverage (share of the l1 mass of the top-10% |dW_Q| removed) and rank(update)/min(d_out, d_in). "
        "Paper: average absolute layer error x1e3 on 4-bit Llama-3.2-3B (another scale: compare orderings).",
    )
    lines += [
        "| bits | init | refine | rel. error (ours) | coverage | norm. rank | held-out ppl | paper x1e3 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows, rank = [], table_rank(model)
    for rep in runs:
        run, s = rep["run"], rep["summary"]
        name = run.get("init")
        if run.get("adapter") != "wha" or run.get("transform") != "wht" or run.get("rank") != rank:
            continue  # Table 2 compares selections on the WHT adapter at the model's table rank
        paper_key = "adaalloc" if name == "qwha" else name
        if name == "qwha" and not run.get("refine"):
            paper_key = "adaalloc_norefine"
        elif not run.get("refine") and name != "zero":
            paper_key = None
        paper = published.TABLE2_LAYER_ERROR.get(paper_key) if paper_key else None
        label = _run_label(run)
        rows.append(
            (
                int(run["bits"]),
                label,
                bool(run.get("refine")),
                s.get("layer_error_relative"),
                s.get("outlier_coverage"),
                s.get("normalized_rank"),
                s.get("heldout_ppl"),
                paper,
            )
        )
    for bits, label, refine, err, cov, rank, ppl, paper in sorted(rows, key=lambda r: (-r[0], r[3] or 9)):
        lines.append(
            f"| {bits} | {label} | {refine} | {_num(err, '.4f')} | {_num(cov, '.3f')} | "
            f"{_num(rank, '.3f')} | {_num(ppl, '.1f')} | {_num(paper)} |"
        )
    return "\n".join(lines) + "\n"


def _evals_by_init(cache: Runs | Path, model: str) -> dict[str, list[dict]]:
    """Eval results of fine-tuned models, grouped by the init artifact they descend from."""
    out: dict[str, list[dict]] = defaultdict(list)
    for res in eval_runs(cache, model):
        info = _manifest(cache, "eval", Path(res["_path"]).name)
        key = info.get("upstream", {}).get("init")
        if key and res.get("target") == "finetune":
            out[key].append(res)
    return out


def _ablation(cache: Runs | Path, model: str, keep) -> list[dict]:
    """One row per init artifact that ``keep(run)`` accepts: the init's own numbers (layer error, held-out
    perplexity before any training) and, where the run was also fine-tuned and evaluated, its GSM8K,
    CSQA and perplexity after tuning."""
    evals = _evals_by_init(cache, model)
    rows = []
    for rep in init_runs(cache, model):
        if not keep(rep["run"]):
            continue
        row = {"run": rep["run"], "init": rep["summary"], "gsm8k": None, "csqa": None, "ppl_tuned": None}
        for res in evals.get(rep["_key"], []):
            if "gsm8k" in res:
                row["gsm8k"] = res["gsm8k"]
                row["ppl_tuned"] = res.get("perplexity", {}).get("ppl")
            if "csqa" in res:
                row["csqa"] = res["csqa"]["average"]
        rows.append(row)
    return rows


def _answer_ppl(gsm8k: dict | None) -> float | None:
    return ((gsm8k or {}).get("answer_nll") or {}).get("ppl")


def _em(gsm8k: dict | None) -> str:
    if not gsm8k:
        return "–"
    return f"{100 * gsm8k['exact_match']:.1f} ({gsm8k.get('correct', '?')}/{gsm8k.get('n', '?')})"


ABLATION_COLUMNS = (
    "rel. layer error | ppl after init | GSM8K EM (ours) | GSM8K answer ppl | ppl after GSM8K tuning "
    "| CSQA avg (ours)",
    "---|---|---|---|---|---",
)
ABLATION_NOTE = (
    "Ours: the init's mean relative layer output error and held-out perplexity (no training), then, where "
    "the run was fine-tuned and evaluated (`stage=all`), GSM8K exact match (correct/n), the perplexity of "
    "the reference GSM8K solutions on the same questions (teacher-forced; it resolves differences that "
    "0-2 correct answers cannot), held-out perplexity after tuning and the CSQA average. `–`: not run. "
    "`make <table> STAGE=init` runs the init columns only (the default at `BUDGET=small`)."
)


def _ablation_cells(row: dict) -> str:
    s = row["init"]
    return (
        f"{_num(s.get('layer_error_relative'), '.4f')} | {_num(s.get('heldout_ppl'), '.1f')} | "
        f"{_em(row['gsm8k'])} | {_num(_answer_ppl(row['gsm8k']), '.2f')} | {_num(row['ppl_tuned'], '.1f')} | "
        f"{_pct(row['csqa'])}"
    )


def _is_qwha(run: dict, rank: int = TABLE2_RANK) -> bool:
    """The paper's QWHA init on the WHT adapter: AdaAlloc with refinement, at the Table 2 budget."""
    return (
        run.get("init") == "qwha"
        and run.get("transform") == "wht"
        and bool(run.get("refine"))
        and run.get("rank") == rank
    )


def _sweep(cache: Runs | Path, model: str, field: str, title: str, paper: dict, paper_bits: int, fmt) -> str:
    """Tables 13 / 14: the QWHA init swept over one setting (`field` of the init run), the others at
    their defaults. The paper's numbers are printed on the rows at the bit width it used
    (``paper_bits``)."""

    def keep(run: dict) -> bool:
        return _is_qwha(run, table_rank(model)) and run.get(field) is not None and at_defaults(run, but=field)

    rows = _ablation(cache, model, keep)
    lines = _header(title, model, len(rows), ABLATION_NOTE)
    lines += [
        f"| bits | {field} | {ABLATION_COLUMNS[0]} | paper GSM8K |",
        f"|---|---|{ABLATION_COLUMNS[1]}|---|",
    ]
    for row in sorted(rows, key=lambda r: (-int(r["run"]["bits"]), r["run"][field])):
        value, bits = row["run"][field], int(row["run"]["bits"])
        published_value = paper.get(value) if bits == paper_bits else None
        lines.append(f"| {bits} | {fmt(value)} | {_ablation_cells(row)} | {_num(published_value)} |")
    return "\n".join(lines) + "\n"


def table13(cache: Runs | Path, model: str) -> str:
    return _sweep(
        cache,
        model,
        "temperature",
        "Table 13: AdaAlloc temperature t (paper: 4-bit Llama-3.2-3B, GSM8K %)",
        published.TABLE13_TEMPERATURE,
        4,
        lambda v: f"{v:g}",
    )


def table14(cache: Runs | Path, model: str) -> str:
    return _sweep(
        cache,
        model,
        "group_size",
        "Table 14: quantization group size (paper: 2-bit Llama-3.2-3B, GSM8K %)",
        published.TABLE14_GROUP_SIZE,
        2,
        str,
    )


# Table 4's axes: the adapter's transform (adapter=wha|dca|dha|sparse) and the support selection.
TABLE4_TRANSFORMS = ("wht", "dct", "dht", "identity")
TABLE4_SELECTIONS = ("qwha", "magnitude", "random")


def table4(cache: Runs | Path, model: str) -> str:
    def keep(run: dict) -> bool:
        return (
            run.get("adapter") == "wha"
            and run.get("transform") in TABLE4_TRANSFORMS
            and run.get("init") in TABLE4_SELECTIONS
            and bool(run.get("refine"))
            and run.get("rank") == table_rank(model)
            and at_defaults(run)
        )

    rows = _ablation(cache, model, keep)
    lines = _header(
        "Table 4: transform x selection (paper: 4-bit Llama-3.2-3B, GSM8K)",
        model,
        len(rows),
        ABLATION_NOTE + " Selection qwha = AdaAlloc; every row refines the values on its support (r = 64 "
        "budget, group 64).",
    )
    lines += [
        f"| bits | transform | selection | {ABLATION_COLUMNS[0]} |",
        f"|---|---|---|{ABLATION_COLUMNS[1]}|",
    ]
    order = {t: i for i, t in enumerate(TABLE4_TRANSFORMS)}
    for row in sorted(
        rows,
        key=lambda r: (
            -int(r["run"]["bits"]),
            order[r["run"]["transform"]],
            TABLE4_SELECTIONS.index(r["run"]["init"]),
        ),
    ):
        run = row["run"]
        lines.append(f"| {run['bits']} | {run['transform']} | {run['init']} | {_ablation_cells(row)} |")
    return "\n".join(lines) + "\n"


def table5(cache: Runs | Path, model: str) -> str:
    """Cost per method: the init stage's wall time and the fine-tuning step time, from the manifests."""
    rows = []
    for _, info in _complete(cache, "finetune"):
        init_key = info.get("upstream", {}).get("init", "")
        init_info = _manifest(cache, "init", init_key)
        if not init_info:
            continue
        report = Runs.of(cache).folder("init", init_key) / "report.json"
        run = {
            **init_run_info(cache, init_info),
            **(json.loads(report.read_text()).get("run", {}) if report.exists() else {}),
        }
        if run.get("model") != model or not at_defaults(run):
            continue
        m = info.get("metrics", {})
        label = finetune_label(run, info, Runs.of(cache).manifest)
        rows.append(
            {
                "method": label,
                "bits": run.get("bits"),
                "data": info.get("config", {}).get("data", {}).get("name"),
                "init_s": init_info.get("wall_time_s"),
                "step_s": m.get("step_time_s"),
                "tok_s": m.get("tokens_per_s"),
                "mem": m.get("peak_mem_mb"),
                "batch": m.get("effective_batch"),
                "machine": machine_label(info.get("machine")),
            }
        )
    lines = _header(
        "Table 5: init and fine-tuning cost per method",
        model,
        len(rows),
        "Ours: wall time of the init stage (calibration Grams + init + its perplexity check), seconds per "
        "optimizer step, training tokens/s and peak memory, from the stage manifests; the machine is the "
        "one that ran the fine-tuning (its GPU, or the CPU kernel set and torch threads; `–` for records "
        "older than that field); compare rows from the same machine and load. Paper: Llama-3.1-8B "
        "Alpaca on an A100, training hours at batch 1 / 16 and init hours for 3B / 8B.",
    )
    lines += [
        "| method | bits | data | init s | s/step | batch | tokens/s | peak MB | machine "
        "| paper train h (b1 / b16) | paper init h (3B / 8B) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (-(r["bits"] or 0), str(r["data"]), *_table3_rank(str(r["method"])))):
        train = published.TABLE5_TRAIN_HOURS.get(r["method"])
        init = published.TABLE5_INIT_HOURS.get(r["method"])
        lines.append(
            f"| {r['method']} | {r['bits']} | {r['data']} | {_num(r['init_s'], '.0f')} | "
            f"{_num(r['step_s'], '.1f')} | {r['batch'] or '–'} | {_num(r['tok_s'], '.0f')} | "
            f"{_num(r['mem'], '.0f')} | {r['machine']} | {f'{train[0]} / {train[1]}' if train else '–'} | "
            f"{f'{init[0]} / {init[1]}' if init else '–'} |"
        )
    return "\n".join(lines) + "\n"


def fig_rank(cache: Runs | Path, model: str, out: Path | None = None) -> str:
    """Error and perplexity after init against the rank budget r, one line per (method, bits); with
    ``out``, also ``fig_rank_<model>.png``."""
    series: dict[tuple[str, int], dict[int, dict]] = defaultdict(dict)
    for rep in init_runs(cache, model):
        run, s = rep["run"], rep["summary"]
        label = _run_label(run)
        if label not in ("qwha", "cloq") or run.get("rank") is None or run.get("bits") is None:
            continue
        if not at_defaults(run):
            continue  # Table 13's temperatures and Table 14's group sizes share r = 64
        if label == "qwha" and (run.get("transform") != "wht" or not run.get("refine")):
            continue
        series[(label, int(run["bits"]))][int(run["rank"])] = s
    lines = _header(
        "Rank budget: error and perplexity after init against r",
        model,
        sum(len(v) for v in series.values()),
        "Budget r = trainable parameters of a rank-r LoRA. qwha: sparse WHT adapter, AdaAlloc + "
        "refinement; cloq: the best rank-r update (closed form). No training. The paper has no such "
        "sweep; its claim to check: at one budget the sparse WHT update fits dW_Q better than low rank.",
    )
    lines += ["| bits | method | r | rel. layer error | held-out ppl |", "|---|---|---|---|---|"]
    for (label, bits), by_rank in sorted(series.items(), key=lambda kv: (-kv[0][1], kv[0][0])):
        for r in sorted(by_rank):
            s = by_rank[r]
            lines.append(
                f"| {bits} | {label} | {r} | {_num(s.get('layer_error_relative'), '.4f')} | "
                f"{_num(s.get('heldout_ppl'), '.1f')} |"
            )
    if out is not None and series:
        _plot_rank(series, model, Path(out) / f"fig_rank_{model}.png")
        lines += ["", f"![rank budget](fig_rank_{model}.png)"]
    return "\n".join(lines) + "\n"


def _plot_rank(series: dict, model: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for (label, bits), by_rank in sorted(series.items()):
        ranks = sorted(by_rank)
        for ax, key in zip(axes, ("layer_error_relative", "heldout_ppl"), strict=True):
            pts = [(r, by_rank[r][key]) for r in ranks if by_rank[r].get(key) is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=f"{label}, {bits}-bit")
    for ax, title in zip(axes, ("relative layer output error", "held-out perplexity"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rank budget r")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[0].legend()
    fig.suptitle(f"{model}: after init, no training")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


RENDERERS = {
    "table2": table2,
    "table3": table3,
    "table4": table4,
    "table5": table5,
    "table13": table13,
    "table14": table14,
    "fig_rank": fig_rank,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("tables", nargs="+", choices=[*TABLES, *FIGURES, "all", "archive"])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--cache", default=os.environ.get("QWHA_CACHE_PATH", ".cache/qwha"))
    ap.add_argument(
        "--runs",
        default=str(RUNS_DIR),
        help="archived run records read after the cache ('none': the cache only); `archive` writes here",
    )
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    if "archive" in args.tables:
        if args.runs == "none":
            ap.error("archive needs --runs DIR")
        n = archive(Path(args.cache), Path(args.runs))
        print(f"archive: records of {n} complete artifacts from {args.cache} in {args.runs}")
        return 0
    runs = Runs(args.cache) if args.runs == "none" else Runs(args.cache, args.runs)
    names = (*TABLES, *FIGURES) if "all" in args.tables else args.tables
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        extra = {"out": out} if name in FIGURES else {}
        text = RENDERERS[name](runs, args.model, **extra)
        (out / f"{name}_{args.model}.md").write_text(text)
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
