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

Evaluation cells carry n and a 95% interval, and Table 3 each method's paired difference to QWHA
(:func:`estimate_cell`, :func:`difference_cell`; statistics in ``qwha/eval/stats.py``), computed from the
per-item records an eval artifact keeps (``records_<suite>.jsonl.gz``, checked against its manifest);
records from before those existed get intervals from their aggregates where derivable, marked.
Runs are produced by `python -m qwha -m experiment=<table> model=<model> budget=<small|paper>`
(`make <table>` does both).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments import published  # noqa: E402
from experiments.rows import ablation_ranks, eval_label, finetune_label, regime_note  # noqa: E402
from qwha.cache import build_id, file_sha256, machine_label  # noqa: E402
from qwha.eval import stats  # noqa: E402
from qwha.eval.csqa import CSQA_TASKS  # noqa: E402
from qwha.eval.records import RECORD_FILES as ITEM_RECORD_FILES  # noqa: E402
from qwha.eval.records import read_records  # noqa: E402

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
    *ITEM_RECORD_FILES,  # per-item eval records (compressed JSON lines)
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
        record itself cannot be the one it read (dated by the earliest record of the same build in any root).
        An upstream with no record here is not held against it."""
        seen = {} if _seen is None else _seen
        builds = info.get("upstream_builds")
        for stage, key in info.get("upstream", {}).items():
            up = self.manifest(stage, key)
            if not up:
                continue
            if builds is not None and stage in builds:
                if builds[stage] != build_id(up):
                    return False
            elif self._first_created(stage, key, up) > _created(info):
                return False
            if (stage, key) not in seen:
                seen[(stage, key)] = True  # guards the recursion; replaced by the answer below
                seen[(stage, key)] = self.consistent(up, seen)
            if not seen[(stage, key)]:
                return False
        return True

    def _first_created(self, stage: str, key: str, up: dict) -> float:
        """When the build ``up`` of (stage, key) first existed: the earliest ``created`` of the records of
        that key with the same files in any root (a byte-identical rebuild in the cache, dated later,
        does not make the records built on the archived one look newer than their upstream)."""
        same = build_id(up)
        return min(_created(i) for _, i in self._candidates(stage, key) if build_id(i) == same)

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
        for path, info in Runs(cache).complete(stage):
            target = dest / stage / path.name
            kept = target / "manifest.json"
            if kept.is_file():
                old = json.loads(kept.read_text())
                if old.get("status") == "complete" and build_id(old) == build_id(info):
                    # the same build made again (same files): the archived record stays, so that records
                    # made on it before, which date their upstream by time, stay consistent
                    continue
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
            res["_preset"] = res.get("method_name")  # the `method=` preset the run was made with
            res["method_name"] = eval_label(res, Runs.of(cache).manifest)  # the row's name today
            res["_files"] = info.get("files", {})
            res["_created"] = _created(info)
            # The quantized model the row was evaluated on: its key and build (None: not recorded).
            res["_quant_build"] = (
                info.get("upstream", {}).get("quantize"),
                (info.get("upstream_builds") or {}).get("quantize"),
            )
            runs.append(res)
    return runs


def item_records(res: dict, suite: str) -> list[dict] | None:
    """The per-item records of ``suite`` (csqa | gsm8k) of an eval result from :func:`eval_runs`, or None
    where the run kept none (runs before they were written) or the file fails its manifest checksum."""
    name = (res.get("records") or {}).get(suite)
    if not name:
        return None
    path = Path(res["_path"]) / name
    if not path.is_file():
        return None
    expected = res.get("_files", {}).get(name)
    if expected is None or file_sha256(path) != expected:
        print(f"render: {path} is not the file its manifest names; its items are left out", file=sys.stderr)
        return None
    return read_records(path)


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
# The row every other row of its bit width is compared with, item by item.
REFERENCE = "qwha"


def _table3_rank(method: str) -> tuple[int, str]:
    return (TABLE3_ORDER.index(method) if method in TABLE3_ORDER else len(TABLE3_ORDER), method)


# ---- cells: an estimate with its n and 95% interval, from per-item records or from the aggregates ----

# metric -> (suite of its records, statistic over items)
METRICS: dict[str, tuple[str, str]] = {
    "csqa": ("csqa", "mean"),
    "em": ("gsm8k", "mean"),
    "ppl": ("gsm8k", "ppl"),
}
NO_ITEMS = "no per-item records"
FROM_AGGREGATES = "†"


@dataclass
class Cell:
    """One table cell: ``est`` with ``n`` items (x ``seeds``) and a 95% interval ``ci`` (None: none
    derivable); ``k`` correct answers for a single-seed accuracy; ``note``: how the interval was had."""

    est: float | None = None
    ci: tuple[float, float] | None = None
    n: int | None = None
    seeds: int = 1
    k: int | None = None
    note: str = ""


def _item_values(records: list[dict], metric: str, task: str | None = None) -> dict:
    """``{item key: (a, b)}`` of one run's records for ``metric`` (see :class:`stats.Arm`)."""
    if metric == "csqa":
        tasks = (task,) if task else CSQA_TASKS
        return {(r["task"], r["doc_id"]): (r["correct"], 1) for r in records if r["task"] in tasks}
    if metric == "em":
        return {r["id"]: (r["correct"], 1) for r in records if "correct" in r}
    return {r["id"]: (r["nll"], r["tokens"]) for r in records if "nll" in r}


def _per_item(replicates: list[dict], metric: str, task: str | None = None) -> list[dict] | None:
    """Each replicate's ``{item: (a, b)}``, or None unless every replicate kept per-item records."""
    out = []
    for res in replicates:
        recs = item_records(res, METRICS[metric][0])
        if recs is None:
            return None
        values = _item_values(recs, metric, task)
        if not values:
            return None
        out.append(values)
    return out


def _arm(per_rep: list[dict], keys: list, metric: str) -> stats.Arm:
    a = np.array([[v[k][0] for k in keys] for v in per_rep], float)
    b = np.array([[v[k][1] for k in keys] for v in per_rep], float)
    strata = np.array([CSQA_TASKS.index(k[0]) for k in keys]) if metric == "csqa" else None
    return stats.Arm(a=a, b=b, strata=strata, stat=METRICS[metric][1])


def _common(*per_reps: list[dict]) -> list:
    keys = set.intersection(*(set(v) for per_rep in per_reps for v in per_rep))
    return sorted(keys, key=str)


def _aggregate(res: dict, metric: str, task: str | None = None) -> tuple[float | None, int | None, object]:
    """(estimate, n, what the interval needs) from a result's aggregates: per-task (value, n) pairs for
    CSQA, (correct, n) for exact match, None for the perplexity (no interval without the items)."""
    if metric == "csqa":
        tasks = res.get("csqa", {}).get("tasks", {})
        names = [task] if task else [t for t in CSQA_TASKS if t in tasks]
        if not names or any(t not in tasks for t in names):
            return None, None, None
        pairs = [(tasks[t]["value"], int(tasks[t]["n"])) for t in names]
        return float(np.mean([p for p, _ in pairs])), sum(n for _, n in pairs), pairs
    g = res.get("gsm8k") or {}
    if metric == "em":
        if "exact_match" not in g:
            return None, None, None
        n = int(g.get("n", 0))
        k = g.get("correct")
        k = int(k) if k is not None else (round(g["exact_match"] * n) if n else None)
        return float(g["exact_match"]), n or None, (k, n) if n else None
    nll = g.get("answer_nll") or {}
    return nll.get("ppl"), nll.get("n"), None


def estimate_cell(replicates: list[dict], metric: str, task: str | None = None) -> Cell:
    """The cell of one row (its replicates: one result per seed) for ``metric`` (csqa | em | ppl; with
    ``task``: that CSQA task's accuracy). Per-item records: Wilson for a single-seed accuracy, else a
    bootstrap over items (within tasks) and seeds. Aggregates only: Wilson from k/n, a normal interval
    from each task's accuracy and n, nothing for a perplexity (:data:`NO_ITEMS`)."""
    if not replicates:
        return Cell()
    per_rep = _per_item(replicates, metric, task)
    if per_rep is not None:
        keys = _common(per_rep)
        if not keys:
            return Cell(note="seeds share no items")
        arm = _arm(per_rep, keys, metric)
        if metric != "ppl" and (metric == "em" or task) and len(per_rep) == 1:
            k = int(arm.a.sum())
            return Cell(k / len(keys), stats.wilson_interval(k, len(keys)), len(keys), 1, k=k)
        est, ci = stats.bootstrap_interval(arm)
        return Cell(est, ci, len(keys), len(per_rep))
    values = [_aggregate(r, metric, task) for r in replicates]
    values = [v for v in values if v[0] is not None]
    if not values:
        return Cell()
    if len(values) > 1:  # seeds without items: their mean, no interval
        return Cell(float(np.mean([v[0] for v in values])), None, values[0][1], len(values), note=NO_ITEMS)
    est, n, extra = values[0]
    if metric == "ppl" or extra is None:
        return Cell(est, None, n, note=NO_ITEMS)
    if metric == "em" or task:
        k, n = extra if metric == "em" else (round(extra[0][0] * extra[0][1]), extra[0][1])
        return Cell(est, stats.wilson_interval(k, n), n, k=k, note=FROM_AGGREGATES)
    ci = stats.mean_of_proportions_interval([p for p, _ in extra], [m for _, m in extra])
    return Cell(est, ci, n, note=FROM_AGGREGATES)


def _builds(replicates: list[dict]) -> set:
    return {r.get("_quant_build", (None, None)) for r in replicates}


def difference_cell(
    replicates: list[dict], reference: list[dict], metric: str, task: str | None = None
) -> Cell:
    """``metric(row) - metric(reference)`` with a 95% interval: paired over the items both scored (a
    bootstrap drawing the same items for both, seeds resampled per row) when both kept per-item records
    and were evaluated on the same quantized-model builds (where one row ran more seeds, on the builds
    both ran, the others left out and the cell says so); else, from single-seed aggregates, an unpaired
    interval (Newcombe for exact match, normal for the CSQA average); else none. ``task``: that CSQA
    task's accuracy, paired on its documents (per-item records only)."""
    if not replicates or not reference:
        return Cell()
    mine, theirs = _per_item(replicates, metric, task), _per_item(reference, metric, task)
    if mine is not None and theirs is not None:
        shared = (_builds(replicates) & _builds(reference)) - {(None, None)}
        if not shared:
            return Cell(note="not paired: another quantized-model build")
        note = "paired"
        if shared != _builds(replicates) or shared != _builds(reference):
            # seeds quantize anew: pair the seeds both rows ran (same quantized models), drop the rest
            replicates = [r for r in replicates if r.get("_quant_build", (None, None)) in shared]
            reference = [r for r in reference if r.get("_quant_build", (None, None)) in shared]
            mine, theirs = _per_item(replicates, metric, task), _per_item(reference, metric, task)
            note = "on the shared quantized builds only"
        keys = _common(mine, theirs)
        if not keys:
            return Cell(note="no common items")
        est, ci = stats.paired_bootstrap_difference(_arm(mine, keys, metric), _arm(theirs, keys, metric))
        return Cell(est, ci, len(keys), max(len(mine), len(theirs)), note=note)
    if len(replicates) > 1 or len(reference) > 1 or task:
        return Cell(note=NO_ITEMS)
    (e1, _, x1), (e2, _, x2) = _aggregate(replicates[0], metric), _aggregate(reference[0], metric)
    if e1 is None or e2 is None:
        return Cell()
    excluded = {
        (r.get("gsm8k") or {}).get("excluded_gsm_symbolic_templates") for r in (replicates[0], reference[0])
    }
    other = ", other questions" if metric != "csqa" and len(excluded) > 1 else ""
    if metric == "ppl" or x1 is None or x2 is None:
        return Cell(e1 - e2, None, None, note=NO_ITEMS + other)
    if metric == "em":
        ci = stats.newcombe_difference(x1[0], x1[1], x2[0], x2[1])
    else:
        ci = stats.mean_of_proportions_difference(
            [p for p, _ in x1], [m for _, m in x1], [p for p, _ in x2], [m for _, m in x2]
        )
    return Cell(e1 - e2, ci, None, note=f"unpaired {FROM_AGGREGATES}{other}")


def _fmt_value(x: float, metric: str, signed: bool = False) -> str:
    text = f"{100 * x:.1f}" if metric != "ppl" else (f"{x:.2f}" if abs(x) < 1000 else f"{x:.0f}")
    return ("+" + text if signed and x >= 0 else text).replace("-", "−")


def fmt_cell(cell: Cell, metric: str, signed: bool = False) -> str:
    """``est [lo, hi] n=N`` (``k/n`` for a single-seed accuracy; ``n=Nx3`` with 3 seeds) and its note."""
    if cell.est is None:
        return cell.note or "–"
    text = _fmt_value(cell.est, metric, signed)
    if cell.ci is not None:
        text += f" [{_fmt_value(cell.ci[0], metric, signed)}, {_fmt_value(cell.ci[1], metric, signed)}]"
    if cell.k is not None and cell.seeds == 1:
        text += f" {cell.k}/{cell.n}"
    elif cell.n is not None:
        text += f" n={cell.n}" + (f"×{cell.seeds}" if cell.seeds > 1 else "")
    if cell.note and cell.note != "paired":
        text += f" {cell.note}" if cell.note.startswith(FROM_AGGREGATES) else f", {cell.note}"
    return text


def _preference(res: dict, suite: str) -> tuple:
    """Which of several records of one (row, seed) a table reads: one with per-item records, then the
    one that scored more items, then the newest."""
    block = res.get(suite) or {}
    n = block.get("n") if suite == "gsm8k" else sum(t.get("n", 0) for t in block.get("tasks", {}).values())
    return (bool((res.get("records") or {}).get(suite)), n or 0, res.get("_created", 0.0))


def replicates_by_row(runs: list[dict], suite: str, row_key) -> dict[tuple, list[dict]]:
    """``{row_key(result): [one result per seed]}`` for the results that hold ``suite``."""
    by_seed: dict[tuple, dict] = {}
    for r in runs:
        if suite not in r:
            continue
        key = (row_key(r), r.get("seed"))
        if key not in by_seed or _preference(r, suite) > _preference(by_seed[key], suite):
            by_seed[key] = r
    rows: dict[tuple, list[dict]] = defaultdict(list)
    for (row, _seed), r in sorted(by_seed.items(), key=lambda kv: str(kv[0][1])):
        rows[row].append(r)
    return rows


CELL_NOTE = (
    "Each cell: estimate [95% interval] and n (items; x seeds when several seeds are replicates). "
    "Accuracies: Wilson interval from k/n for one seed; the CSQA average (mean of the 7 tasks): bootstrap "
    "over documents within tasks; answer perplexity exp(sum nll / sum tokens): bootstrap over questions; "
    "with several seeds the bootstrap also resamples seeds. Δ vs qwha: the row minus the qwha row of its "
    "bit width on the same items (paired bootstrap; rows evaluated on different quantized-model builds are "
    "not paired; a seed quantizes anew, so where one row ran more seeds, only the seeds both ran are paired, "
    f"'on the shared quantized builds only'). {FROM_AGGREGATES}: a run from before per-item records were "
    "kept: interval from its aggregates (Wilson from k/n; CSQA: normal from each task's accuracy and n), "
    "differences unpaired; "
    f"'{NO_ITEMS}': nothing derivable (a perplexity); 'other questions': the two rows scored different "
    "GSM8K questions (older untuned rows kept the 100 template questions that tuned rows leave out)."
)


def _method(res: dict) -> str:
    if res.get("method_name") not in (None, "custom"):
        return res["method_name"]
    if res.get("target") == "quantize":
        return "gptq_magr"
    return f"{res.get('adapter')}/{res.get('init')}"


def table3(cache: Runs | Path, model: str) -> str:
    runs = eval_runs(cache, model)
    row_key = lambda r: (_method(r), int(r["bits"]))  # noqa: E731
    csqa = replicates_by_row(runs, "csqa", row_key)
    gsm = replicates_by_row(runs, "gsm8k", row_key)
    rows = sorted(set(csqa) | set(gsm), key=lambda k: (-k[1], *_table3_rank(k[0])))
    lines = _header(
        "Table 3: methods x bits (CSQA avg / GSM8K, %)",
        model,
        len(runs),
        "Paper columns: Llama-3.2-3B (and 3.1-8B 2-bit where published). lota = LoTA-QAF (arXiv "
        "2505.18724), the second method family: the QWHA paper publishes no numbers for it. " + CELL_NOTE,
    )
    lines += [
        "| method | bits | CSQA avg (ours) | Δ CSQA vs qwha | GSM8K EM (ours) | Δ EM vs qwha "
        "| GSM8K answer ppl (ours) | Δ answer ppl vs qwha | CSQA avg (paper 3B) | GSM8K (paper 3B) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def diff(method: str, bits: int, by_row: dict, metric: str) -> str:
        if method == REFERENCE:
            return "–"
        cell = difference_cell(by_row.get((method, bits), []), by_row.get((REFERENCE, bits), []), metric)
        return fmt_cell(cell, metric, signed=True)

    for method, bits in rows:
        c, g = csqa.get((method, bits), []), gsm.get((method, bits), [])
        paper = published.TABLE3.get(("llama3.2-3b", bits), {}).get(method)
        lines.append(
            f"| {method} | {bits} | {fmt_cell(estimate_cell(c, 'csqa'), 'csqa')} | "
            f"{diff(method, bits, csqa, 'csqa')} | {fmt_cell(estimate_cell(g, 'em'), 'em')} | "
            f"{diff(method, bits, gsm, 'em')} | {fmt_cell(estimate_cell(g, 'ppl'), 'ppl')} | "
            f"{diff(method, bits, gsm, 'ppl')} | "
            f"{_num(paper[0]) if paper else '–'} | {_num(paper[1]) if paper else '–'} |"
        )
    scored = {t for reps in csqa.values() for r in reps for t in r["csqa"].get("tasks", {})}
    tasks = [t for t in CSQA_TASKS if t in scored]
    if tasks:
        lines += [
            "",
            "CSQA per task (accuracy %, the task's metric: acc_norm for ARC, HellaSwag, OBQA, PIQA; acc for "
            "BoolQ, WinoGrande), [Wilson 95%] k/n:",
            "",
            "| method | bits | " + " | ".join(tasks) + " |",
            "|---|---|" + "---|" * len(tasks),
        ]
        for method, bits in [k for k in rows if k in csqa]:
            cells = [fmt_cell(estimate_cell(csqa[(method, bits)], "csqa", task=t), "em") for t in tasks]
            lines.append(f"| {method} | {bits} | " + " | ".join(cells) + " |")
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
        "| bits | r | init | refine | rel. error (ours) | coverage | norm. rank | held-out ppl "
        "| paper x1e3 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows, ranks = [], ablation_ranks(model)
    for rep in runs:
        run, s = rep["run"], rep["summary"]
        name = run.get("init")
        if run.get("adapter") != "wha" or run.get("transform") != "wht" or run.get("rank") not in ranks:
            continue  # Table 2 compares selections on the WHT adapter at the model's table ranks
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
                int(run["rank"]),
                label,
                bool(run.get("refine")),
                s.get("layer_error_relative"),
                s.get("outlier_coverage"),
                s.get("normalized_rank"),
                s.get("heldout_ppl"),
                paper,
            )
        )
    for bits, r, label, refine, err, cov, rank, ppl, paper in sorted(
        rows, key=lambda r: (-r[0], r[1], r[4] or 9)
    ):
        lines.append(
            f"| {bits} | {r} | {label} | {refine} | {_num(err, '.4f')} | {_num(cov, '.3f')} | "
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
    CSQA and perplexity after tuning (the eval results themselves, one per seed, so that cells can read
    their per-item records)."""
    evals = _evals_by_init(cache, model)
    rows = []
    for rep in init_runs(cache, model):
        if not keep(rep["run"]):
            continue
        mine = evals.get(rep["_key"], [])
        gsm = next(iter(replicates_by_row(mine, "gsm8k", lambda r: 0).values()), [])
        csqa = next(iter(replicates_by_row(mine, "csqa", lambda r: 0).values()), [])
        ppl = [r.get("perplexity", {}).get("ppl") for r in gsm if r.get("perplexity")]
        rows.append(
            {
                "run": rep["run"],
                "init": rep["summary"],
                "gsm8k": gsm,
                "csqa": csqa,
                "ppl_tuned": float(np.mean(ppl)) if ppl else None,
            }
        )
    return rows


ABLATION_COLUMNS = (
    "rel. layer error | ppl after init | GSM8K EM (ours) | GSM8K answer ppl | ppl after GSM8K tuning "
    "| CSQA avg (ours)",
    "---|---|---|---|---|---",
)
ABLATION_NOTE = (
    "Ours: the init's mean relative layer output error and held-out perplexity (no training), then, where "
    "the run was fine-tuned and evaluated (`stage=all`), GSM8K exact match, the perplexity of "
    "the reference GSM8K solutions (teacher-forced; it resolves differences that "
    "0-2 correct answers cannot), held-out perplexity after tuning and the CSQA average. `–`: not run. "
    "`make <table> STAGE=init` runs the init columns only (the default at `BUDGET=small`). " + CELL_NOTE
)


def _ablation_cells(row: dict) -> str:
    s = row["init"]
    return (
        f"{_num(s.get('layer_error_relative'), '.4f')} | {_num(s.get('heldout_ppl'), '.1f')} | "
        f"{fmt_cell(estimate_cell(row['gsm8k'], 'em'), 'em')} | "
        f"{fmt_cell(estimate_cell(row['gsm8k'], 'ppl'), 'ppl')} | {_num(row['ppl_tuned'], '.1f')} | "
        f"{fmt_cell(estimate_cell(row['csqa'], 'csqa'), 'csqa')}"
    )


def _is_qwha(run: dict, ranks: tuple[int, ...] = (TABLE2_RANK,)) -> bool:
    """The paper's QWHA init on the WHT adapter: AdaAlloc with refinement, at one of the table ranks."""
    return (
        run.get("init") == "qwha"
        and run.get("transform") == "wht"
        and bool(run.get("refine"))
        and run.get("rank") in ranks
    )


def _sweep(cache: Runs | Path, model: str, field: str, title: str, paper: dict, paper_bits: int, fmt) -> str:
    """Tables 13 / 14: the QWHA init swept over one setting (`field` of the init run), the others at
    their defaults. The paper's numbers are printed on the rows at the bit width it used
    (``paper_bits``)."""

    def keep(run: dict) -> bool:
        ranks = ablation_ranks(model)
        return _is_qwha(run, ranks) and run.get(field) is not None and at_defaults(run, but=field)

    rows = _ablation(cache, model, keep)
    lines = _header(title, model, len(rows), ABLATION_NOTE)
    lines += [
        f"| bits | r | {field} | {ABLATION_COLUMNS[0]} | paper GSM8K |",
        f"|---|---|---|{ABLATION_COLUMNS[1]}|---|",
    ]
    for row in sorted(rows, key=lambda r: (-int(r["run"]["bits"]), r["run"]["rank"], r["run"][field])):
        value, bits = row["run"][field], int(row["run"]["bits"])
        published_value = paper.get(value) if bits == paper_bits else None
        r = row["run"]["rank"]
        lines.append(f"| {bits} | {r} | {fmt(value)} | {_ablation_cells(row)} | {_num(published_value)} |")
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
            and run.get("rank") in ablation_ranks(model)
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
        f"| bits | r | transform | selection | {ABLATION_COLUMNS[0]} |",
        f"|---|---|---|---|{ABLATION_COLUMNS[1]}|",
    ]
    order = {t: i for i, t in enumerate(TABLE4_TRANSFORMS)}
    for row in sorted(
        rows,
        key=lambda r: (
            -int(r["run"]["bits"]),
            r["run"]["rank"],
            order[r["run"]["transform"]],
            TABLE4_SELECTIONS.index(r["run"]["init"]),
        ),
    ):
        run = row["run"]
        lines.append(
            f"| {run['bits']} | {run['rank']} | {run['transform']} | {run['init']} | {_ablation_cells(row)} |"
        )
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
