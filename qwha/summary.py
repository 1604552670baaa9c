"""The end of a first run: the full-precision, quantized, initialized and tuned models side by side.

``python -m qwha`` under the default budget of a model with ``first_run.compare: true`` (the embedded
SmolLM2, ``make run``) evaluates three more artifacts through the ordinary cached eval stage, on the same
held-out tokens and the same questions as the tuned model:

- full precision: ``quant.method=none`` (the base model itself), ``eval.target=quantize``;
- quantized: ``eval.target=quantize``;
- initialized: ``eval.target=init`` (the adapter before any training);

and prints one table (each metric with its n), one line of reading, where the artifacts are, the time
each stage took, and the commands that export or load the result. A rerun is served from the cache.
"""

from __future__ import annotations

import json
import math
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from qwha.artifacts import ADAPTER_DIR, MODEL_DIR, RESULTS

LABELS = ("full precision", "quantized", "initialized", "tuned")


@dataclass
class Row:
    """One model's metrics: ``values[name] = (value, n, unit)``; ``path`` is its eval artifact."""

    label: str
    values: dict[str, tuple[float, int, str]] = field(default_factory=dict)
    path: Path | None = None


# metric name in an eval summary -> (column title, lower is better)
METRICS = {
    "ppl": ("held-out ppl", True),
    "gsm8k_answer_ppl": ("GSM8K answer ppl", True),
    "gsm8k_em": ("GSM8K exact match", False),
    "csqa_avg": ("CSQA avg acc", False),
    "val_response_ppl": ("validation response ppl", True),
}


def wanted(cfg: DictConfig) -> bool:
    """Whether this run ends with the comparison (whole pipeline, tuned target, ``first_run.compare``)."""
    return (
        cfg.stage == "all"
        and cfg.eval.target == "finetune"
        and bool(OmegaConf.select(cfg, "first_run.compare", default=False))
    )


def variant(cfg: DictConfig, changes: dict) -> DictConfig:
    """A copy of ``cfg`` with dotted keys set (added when absent)."""
    out = cfg.copy()
    for key, value in changes.items():
        OmegaConf.update(out, key, value, force_add=True)
    return out


def baseline_changes(tuned_results: dict) -> dict[str, dict]:
    """The overrides that evaluate the three reference models. They score the tuned model's items: the
    eval stage leaves the same GSM8K questions out of every row (``eval.gsm8k.exclude``) and its CSQA
    sample and held-out tokens do not depend on the target."""
    return {
        "full precision": {"quant.method": "none", "eval.target": "quantize"},
        "quantized": {"eval.target": "quantize"},
        "initialized": {"eval.target": "init"},
    }


def row_from_results(label: str, results: dict, path: Path | None = None) -> Row:
    """The metrics of one ``results.json`` (eval stage) with their n."""
    row = Row(label, path=path)
    if "perplexity" in results:
        p = results["perplexity"]
        row.values["ppl"] = (float(p["ppl"]), int(p["tokens"]), "tokens")
    g = results.get("gsm8k")
    if g:
        if "answer_nll" in g:
            row.values["gsm8k_answer_ppl"] = (
                float(g["answer_nll"]["ppl"]),
                int(g["answer_nll"]["n"]),
                "solutions",
            )
        row.values["gsm8k_em"] = (float(g["exact_match"]), int(g["n"]), "questions")
    c = results.get("csqa")
    if c:
        row.values["csqa_avg"] = (float(c["average"]), len(c.get("tasks", {})) or 0, "tasks")
    v = results.get("validation")
    if v:
        row.values["val_response_ppl"] = (float(v["ppl"]), int(v["n"]), "records")
    return row


def collect(cfg: DictConfig, cache, done: dict) -> tuple[list[Row], dict[str, tuple]]:
    """Evaluate (or read from the cache) the three reference models; rows in ``LABELS`` order and every
    artifact touched, ``{name: (artifact, hit)}``, for the timing line."""
    from qwha.pipeline import materialize

    tuned_art = done["eval"][0]
    tuned = json.loads((tuned_art.path / RESULTS).read_text())
    touched: dict[str, tuple] = {}
    rows = []
    for label, changes in baseline_changes(tuned).items():
        sub: dict = {}
        art = materialize("eval", variant(cfg, changes), cache, done=sub)
        for name, value in sub.items():
            touched[f"{name} ({label})"] = value
        rows.append(row_from_results(label, json.loads((art.path / RESULTS).read_text()), art.path))
    rows.append(row_from_results("tuned", tuned, tuned_art.path))
    return rows, touched


def _fmt(name: str, value: float, n: int) -> str:
    if name == "gsm8k_em":
        return f"{round(value * n)}/{n}"
    if name == "csqa_avg":
        return f"{100 * value:.1f} %"
    return f"{value:,.1f}" if value >= 100 else f"{value:.2f}"


def table(rows: list[Row]) -> str:
    """A markdown table, one column per metric present in every row, its n in the header."""
    names = [m for m in METRICS if all(m in r.values for r in rows)]
    head = []
    for m in names:
        title, lower = METRICS[m]
        n, unit = rows[-1].values[m][1], rows[-1].values[m][2]
        head.append(f"{title} ({'lower' if lower else 'higher'} is better; n = {n:,} {unit})")
    lines = ["| model | " + " | ".join(head) + " |", "|---|" + "---|" * len(names)]
    for r in rows:
        cells = [_fmt(m, r.values[m][0], r.values[m][1]) for m in names]
        lines.append(f"| {r.label} | " + " | ".join(cells) + " |")
    mismatched = [METRICS[m][0] for m in names if len({r.values[m][1] for r in rows}) > 1]
    if mismatched:
        lines.append(f"(n differs between rows for {', '.join(mismatched)}: compare with care)")
    return "\n".join(lines)


def reading(rows: list[Row], cfg: DictConfig) -> str:
    """One line that says what the numbers mean, written from the numbers."""
    by = {r.label: r.values for r in rows}
    parts = []
    if all("ppl" in by[k] for k in LABELS):
        fp, q, i, t = (by[k]["ppl"][0] for k in LABELS)
        parts.append(f"{cfg.bits}-bit quantization moves held-out perplexity from {_num(fp)} to {_num(q)}")
        if i < q:
            parts.append(
                f"the adapter's quantization-aware init brings it back to {_num(i)} before any training"
            )
        else:
            parts.append(f"the init takes it to {_num(i)}")
    task = "gsm8k_answer_ppl" if "gsm8k_answer_ppl" in by["tuned"] else "val_response_ppl"
    steps = cfg.train.max_steps
    tuning = f"{steps} fine-tuning step{'s' if steps != 1 else ''}" if steps else "fine-tuning"
    if all(task in by[k] for k in ("initialized", "tuned")):
        i_a, t_a = by["initialized"][task][0], by["tuned"][task][0]
        what = "GSM8K answer perplexity" if task == "gsm8k_answer_ppl" else "validation response perplexity"
        if t_a < i_a:
            parts.append(f"{tuning} lower the {what} (the task trained on) from {_num(i_a)} to {_num(t_a)}")
        else:
            parts.append(
                f"{tuning} did not lower the {what} (the task trained on): {_num(i_a)} -> {_num(t_a)}"
            )
        if "ppl" in by["tuned"] and by["tuned"]["ppl"][0] > 1.1 * by["initialized"]["ppl"][0]:
            parts.append(
                f"while held-out text perplexity rises ({_num(by['initialized']['ppl'][0])} -> "
                f"{_num(by['tuned']['ppl'][0])}): the adapter specializes in the tuning data"
            )
    if "gsm8k_em" in by["tuned"]:
        ems = [by[k]["gsm8k_em"] for k in LABELS if "gsm8k_em" in by[k]]
        if max(round(v * n) for v, n, _ in ems) <= 1:
            parts.append(
                f"exact match is {round(ems[0][0] * ems[0][1])}/{ems[0][1]} even at full precision: a "
                f"model this small ({cfg.model.name}) rarely solves GSM8K, so read the answer perplexity"
            )
    return "Reading: " + "; ".join(parts) + "." if parts else ""


def _num(x: float) -> str:
    return "inf" if not math.isfinite(x) else (f"{x:,.0f}" if x >= 100 else f"{x:.1f}")


def timing(done: dict, extra: dict) -> str:
    """Seconds per stage computed in this process (cached stages cost nothing), from the manifests."""
    parts, total = [], 0.0
    for name, (art, hit) in {**done, **extra}.items():
        if hit:
            continue
        secs = float(art.manifest.get("wall_time_s") or 0.0)
        total += secs
        parts.append(f"{name} {secs:.0f}")
    if not parts:
        return "Time: everything came from the cache."
    return f"Time (s): {', '.join(parts)}; total {total:.0f} s ({total / 60:.1f} min)."


def user_overrides() -> list[str]:
    """The command-line overrides of this Hydra run (empty outside one)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except Exception:  # noqa: BLE001 - not inside a Hydra app (tests, notebooks)
        return []


def render(cfg: DictConfig, rows: list[Row], done: dict, extra: dict) -> str:
    """The whole end-of-run text."""
    quant = done.get("quantize", (None, None))[0]
    tuned_adapter = done.get("finetune", (None, None))[0]
    args = " ".join(shlex.quote(a) for a in user_overrides())
    args = f" {args}" if args else ""
    lines = [
        "",
        f"== First run: {cfg.model.name}, {cfg.bits}-bit {cfg.quant.method} (group {cfg.group_size}), "
        f"{cfg.adapter.method} adapter ({cfg.init.method} init, rank budget {cfg.rank}), "
        f"tuned on {cfg.data.name} ==",
        table(rows),
        reading(rows, cfg),
        "",
        "Artifacts (cache: " + str(Path(cfg.cache_dir).resolve()) + "):",
    ]
    if quant is not None:
        lines.append(f"  quantized model   {quant.path / MODEL_DIR}")
    if tuned_adapter is not None:
        lines.append(f"  tuned adapter     {tuned_adapter.path / ADAPTER_DIR}")
    lines.append(f"  eval results      {rows[-1].path / RESULTS if rows[-1].path else '-'}")
    lines += [
        timing(done, extra),
        "",
        "Next:",
        f"  python -m qwha stage=export export.format=dense{args}   # a plain transformers folder",
        f"  python -m qwha stage=export export.format=gptq{args}    # re-quantized, GPTQModel format",
    ]
    if tuned_adapter is not None:
        lines.append(
            f"  python -c \"import qwha; model, tok = qwha.load_tuned('{tuned_adapter.path}')\"   # in Python"
        )
    return "\n".join(lines)


def first_run_summary(cfg: DictConfig, cache, done: dict) -> str:
    """Evaluate the reference models (cached) and render the end-of-run text."""
    rows, extra = collect(cfg, cache, done)
    return render(cfg, rows, done, extra)


__all__ = ["LABELS", "Row", "first_run_summary", "reading", "render", "row_from_results", "table", "wanted"]
