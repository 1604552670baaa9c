"""The decisive comparison, one command: learning rate per method by a sweep on held-out *training* data,
then the Table 3 runs at each method's own rate, with several seeds for QWHA and the best baseline.

    python experiments/decisive.py all --bits 2                                   # sweep, select, seeds
    python experiments/decisive.py all --bits 4 --methods qwha,cloq --seeds 0     # the 4-bit check
    python experiments/decisive.py sweep  --bits 2 [--dry-run]                    # each step alone
    python experiments/decisive.py select --bits 2                                # from the archive
    python experiments/decisive.py seeds  --bits 2 --seeds 0,1,2 [--dry-run]
    python experiments/decisive.py sweep  --bits 2 --shard 2/2                    # a second worker (core)
    python experiments/decisive.py report --bits 2                                # the test-set rows so far
    python experiments/decisive.py tables                # every bit width's selection + report (make render)

`make decisive BITS=2` / `make decisive BITS=4 METHODS=qwha,cloq SEEDS=0` run ``all``.

1. ``sweep``: for each method and data set (GSM8K-style, Alpaca-style), three runs at the method's recipe
   learning rate times 1/3, 1 and 3 (``--factors``), fine-tuned at ``budget=small`` and scored only by
   ``eval.train_heldout`` (the fine-tuning loss on training-distribution records the run did not train on;
   the test suites are off, so no test item informs the choice). Seed 0.
2. ``select``: from the archived records, per (method, data, bits) the rate with the lowest held-out loss
   (token-weighted nll; ties: the smaller rate), with each rate's held-out perplexity, its 95% bootstrap
   interval and its paired difference to the chosen one; written to
   ``experiments/results/lr_selection_<model>_<bits>bit.md``. The best baseline of a data set: the method
   other than QWHA whose chosen rate reached the lowest held-out loss.
3. ``seeds``: the quantized model alone (``method=gptq_magr``) and every method at its chosen rate with
   seed 0, the test suites on; QWHA and the best baseline also with the other ``--seeds``. A fine-tune
   already run by the sweep (seed 0, same rate) is a cache hit: only its evaluation runs.

Every run is archived as it finishes (``render.py archive``), so an interrupted campaign keeps what it
did and a rerun skips cached stages. ``all`` ends by rendering Table 3.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import subprocess
import sys
from collections import defaultdict
from fractions import Fraction
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments import render  # noqa: E402
from experiments.rows import TABLE3_QUANT  # noqa: E402
from qwha.eval import stats  # noqa: E402
from qwha.eval.csqa import CSQA_TASKS  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = "qwha"
METHODS = ("qwha", "cloq", "ssh", "loca", "shira", "qlora")
DATA = ("gsm8k", "alpaca")
FACTORS = (1 / 3, 1.0, 3.0)
# The sweep's runs: scored on held-out training records only.
SWEEP_EVAL = (
    "eval.train_heldout.enabled=true",
    "eval.csqa.enabled=false",
    "eval.gsm8k.enabled=false",
)


@functools.cache
def _composed(model: str, method: str, data: str, bits: int, budget: str = "small"):
    """The config a campaign run composes (model, method preset, data, bits, budget)."""
    from hydra import compose, initialize_config_dir

    import qwha.config  # noqa: F401  (resolvers)

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(
            "config",
            overrides=[
                f"model={model}",
                f"budget={budget}",
                f"method={method}",
                f"data={data}",
                f"bits={bits}",
            ],
        )


def recipe_lr(model: str, method: str, data: str, bits: int, budget: str = "small") -> float:
    """The learning rate the config gives (model, method, data, bits): the sweep's centre."""
    return float(_composed(model, method, data, bits, budget).train.lr)


@functools.cache
def _presets(model: str, data: str, bits: int) -> dict[str, str]:
    """``{row label: method preset}``: the name a run records (``method_name``) is not always its preset's
    (``method=loca`` at ``budget=small`` is too short for a location step, so its rows are ``loca_fixed``);
    the campaign selects and reruns by preset."""
    return {str(_composed(model, m, data, bits).method_name): m for m in (*METHODS, "gptq_magr")}


def preset_of(res: dict, model: str, bits: int) -> str:
    """The method preset an eval result was made with (its recorded label, mapped back)."""
    label, data = res.get("_preset") or render._method(res), str(res.get("data"))
    return _presets(model, data, bits).get(label, label) if data in DATA else label


def _lr(x: float) -> str:
    return f"{x:.3g}"


def run_args(
    model: str, method: str, data: str, bits: int, lr: float | None = None, seed: int = 0
) -> list[str]:
    """One campaign run's ``python -m qwha`` arguments: ``budget=small`` and the Table 3 quantizer, so
    every row pairs with ``make table3``'s; GPTQ alone (``lr=None``) has no rate or seed. A tuned run
    leaves the held-out text perplexity off (not a Table 3 metric): the init stage's report includes it
    when it is on, so it is part of the init and fine-tune keys, and the sweep's artifacts are reused by
    the seed-0 test runs only when both leave it off."""
    head = [f"model={model}", "budget=small", f"method={method}", f"data={data}", f"bits={bits}"]
    tuned = [] if lr is None else [f"train.lr={_lr(lr)}", f"seed={seed}", "eval.perplexity.enabled=false"]
    return [*head, *tuned, *TABLE3_QUANT]


def sweep_commands(model: str, bits: int, methods, data_sets, factors=FACTORS) -> list[list[str]]:
    """The ``python -m qwha`` argument lists of the sweep, one per (method, data, rate)."""
    return [
        [*run_args(model, method, data, bits, centre * f), *SWEEP_EVAL]
        for method in methods
        for data in data_sets
        for centre in (recipe_lr(model, method, data, bits),)
        for f in factors
    ]


def _is_sweep_record(res: dict) -> bool:
    """A learning-rate sweep record: seed 0, with ``train_heldout`` scored at a known rate and bit width."""
    return (
        (res.get("train_heldout") or {}).get("lr") is not None
        and res.get("seed") == 0
        and res.get("bits") is not None
    )


def heldout_results(runs: render.Runs, model: str, bits: int) -> dict[tuple[str, str], dict[float, dict]]:
    """``{(method, data): {lr: eval result}}`` of the sweep records (seed 0, with ``train_heldout``)."""
    out: dict[tuple[str, str], dict[float, dict]] = defaultdict(dict)
    for res in render.eval_runs(runs, model):
        if not _is_sweep_record(res) or int(res["bits"]) != bits:
            continue
        h = res["train_heldout"]
        # the preset the run was made with: a swept rate differs from the recipe's, so its row label
        # says "(old: lr)", but it is the same method
        key = (preset_of(res, model, bits), str(res.get("data")))
        lr = float(h["lr"])
        if lr not in out[key] or res.get("_created", 0) > out[key][lr].get("_created", 0):
            out[key][lr] = res
    return dict(out)


def swept_bits(runs: render.Runs, model: str) -> list[int]:
    """The bit widths with learning-rate sweep records of ``model``: the ones the campaign's tables exist
    for."""
    return sorted({int(res["bits"]) for res in render.eval_runs(runs, model) if _is_sweep_record(res)})


def _loss(res: dict) -> float:
    """A run's held-out loss for ranking; a diverged run (NaN or infinite loss) ranks last, never first
    (``min`` over NaN keys depends on the order it meets them)."""
    nll = float(res["train_heldout"]["nll"])
    return nll if math.isfinite(nll) else math.inf


def select(by_rate: dict[float, dict]) -> float:
    """The rate with the lowest held-out loss (nats per token); ties: the smaller rate."""
    return min(by_rate, key=lambda lr: (_loss(by_rate[lr]), lr))


def best_baseline(found: dict[tuple[str, str], dict[float, dict]], data: str) -> str | None:
    """The method other than QWHA whose chosen rate reached the lowest held-out loss on ``data``."""
    scores = {
        method: _loss(by_rate[select(by_rate)])
        for (method, d), by_rate in found.items()
        if d == data and method != REFERENCE and by_rate
    }
    return min(scores, key=lambda m: (scores[m], m)) if scores else None


def _heldout_arm(res: dict) -> stats.Arm | None:
    recs = render.item_records(res, "heldout")
    if not recs:
        return None
    return stats.Arm(a=[[r["nll"] for r in recs]], b=[[r["tokens"] for r in recs]], stat="ppl")


def selection_table(found: dict[tuple[str, str], dict[float, dict]], model: str, bits: int) -> str:
    """Markdown: every swept rate's held-out perplexity [95%] and its paired difference to the chosen one."""
    lines = [
        f"# Learning-rate selection: {model}, {bits}-bit (held-out training records, never test items)",
        "",
        "Per method and data set, each swept rate's fine-tuning perplexity on held-out training-distribution "
        "records (`eval.train_heldout`: exp of the token-weighted loss) [bootstrap 95% over records], "
        "and its paired difference to the chosen rate (the lowest loss) on the same records. "
        "`experiments/decisive.py select` writes this file.",
        "",
        "| data | method | lr | held-out ppl | Δ vs chosen | chosen |",
        "|---|---|---|---|---|---|",
    ]
    for data in DATA:
        for (method, d), by_rate in sorted(found.items()):
            if d != data:
                continue
            chosen = select(by_rate)
            ref = _heldout_arm(by_rate[chosen])
            for lr in sorted(by_rate):
                res = by_rate[lr]
                h = res["train_heldout"]
                arm = _heldout_arm(res)
                cell = render.Cell(h["ppl"], None, h.get("n"))
                diff = render.Cell()
                if arm is not None:
                    cell.est, cell.ci = stats.bootstrap_interval(arm)
                    if ref is not None and lr != chosen and arm.n_items == ref.n_items:
                        est, ci = stats.paired_bootstrap_difference(arm, ref)
                        diff = render.Cell(est, ci, arm.n_items)
                lines.append(
                    f"| {data} | {method} | {_lr(lr)} | {render.fmt_cell(cell, 'ppl')} | "
                    f"{'–' if lr == chosen else render.fmt_cell(diff, 'ppl', signed=True)} | "
                    f"{_chosen_mark(by_rate, chosen) if lr == chosen else ''} |"
                )
        best = best_baseline(found, data)
        if best:
            lines.append(f"| {data} | best baseline: **{best}** | | | | |")
    lines += _versus_reference(found)
    return "\n".join(lines) + "\n"


def _chosen_mark(by_rate: dict[float, dict], chosen: float) -> str:
    """The "chosen" cell, saying when the sweep did not bracket the optimum: one rate swept, or the chosen
    rate is the largest (smallest) swept, so a better one may lie above (below) the grid."""
    if len(by_rate) == 1:
        return "**yes** (the only rate swept)"
    if chosen == max(by_rate):
        return "**yes** (largest swept: the optimum may lie above)"
    if chosen == min(by_rate):
        return "**yes** (smallest swept: the optimum may lie below)"
    return "**yes**"


def _versus_reference(found: dict[tuple[str, str], dict[float, dict]]) -> list[str]:
    """Markdown lines: each method at its chosen rate minus QWHA at its own, paired on the same held-out
    records (the records are drawn once per data set, so every run scored the same ones)."""
    lines = []
    for data in DATA:
        ref_rates = found.get((REFERENCE, data))
        ref = _heldout_arm(ref_rates[select(ref_rates)]) if ref_rates else None
        if ref is None:
            continue
        for (method, d), by_rate in sorted(found.items()):
            if d != data or method == REFERENCE:
                continue
            lr = select(by_rate)
            arm = _heldout_arm(by_rate[lr])
            if arm is None or arm.n_items != ref.n_items:
                continue
            if not lines:
                lines = [
                    "",
                    f"Each method at its chosen rate minus {REFERENCE} at its own, paired on the same "
                    "held-out records (perplexity):",
                    "",
                    f"| data | method | lr | Δ held-out ppl vs {REFERENCE} |",
                    "|---|---|---|---|",
                ]
            est, ci = stats.paired_bootstrap_difference(arm, ref)
            cell = render.fmt_cell(render.Cell(est, ci, arm.n_items), "ppl", signed=True)
            lines.append(f"| {data} | {method} | {_lr(lr)} | {cell} |")
    return lines


def seed_commands(
    found: dict[tuple[str, str], dict[float, dict]], model: str, bits: int, seeds: list[int]
) -> list[list[str]]:
    """The Table 3 runs, per data set, most informative first (a campaign cut short keeps the paired
    comparisons that matter): GPTQ alone, QWHA and the best baseline at the first seed, every other swept
    method at its chosen rate, then QWHA and the best baseline at the other seeds."""
    out = []
    for data in DATA:
        methods = sorted({m for (m, d) in found if d == data})
        if not methods:
            continue
        out.append(run_args(model, "gptq_magr", data, bits))
        best = best_baseline(found, data)
        replicated = [m for m in (REFERENCE, best) if m in methods]
        order = replicated + [m for m in methods if m not in replicated]
        chosen = {m: select(found[(m, data)]) for m in methods}
        out += [run_args(model, m, data, bits, chosen[m], seeds[0]) for m in order]
        out += [run_args(model, m, data, bits, chosen[m], seed) for seed in seeds[1:] for m in replicated]
    return out


def _run_lr(res: dict, runs: render.Runs) -> float | None:
    """The learning rate the run was fine-tuned with (its fine-tune manifest), None for an untuned row."""
    key = (res.get("upstream") or {}).get("finetune")
    lr = ((runs.manifest("finetune", key).get("config") or {}).get("train") or {}).get("lr") if key else None
    return None if lr is None else float(lr)


def _per_seed(rows: dict[str, list[dict]], metrics, names: dict[str, str]) -> list[str]:
    """Markdown lines: for each method run at several seeds, its paired difference to QWHA seed by seed
    (the two runs of a seed share its quantized model and its items), so the seeds' spread shows beside
    the pooled interval."""
    ref = {r.get("seed"): r for r in rows.get(REFERENCE, [])}
    lines = []
    for method in sorted(m for m in rows if m not in ("gptq_magr", REFERENCE)):
        seeds = [r.get("seed") for r in rows[method] if r.get("seed") in ref]
        if len(seeds) < 2:
            continue
        if not lines:
            lines = [
                "",
                "Per seed (each seed's runs share its quantized model: calibration windows re-drawn):",
                "",
                "| method | seed | " + " | ".join(f"Δ {names[m]} vs qwha" for m in metrics) + " |",
                "|---|---|" + "---|" * len(metrics),
            ]
        for r in rows[method]:
            if r.get("seed") not in ref:
                continue
            cells = [
                render.fmt_cell(render.difference_cell([r], [ref[r.get("seed")]], m), m, signed=True)
                for m in metrics
            ]
            lines.append(f"| {method} | {r.get('seed')} | " + " | ".join(cells) + " |")
    return lines


LOWER_IS_BETTER = {"ppl"}


def _pairwise(rows: dict[str, list[dict]], metric: str, name: str) -> list[str]:
    """Markdown lines: every two tuned methods, best estimate first, with the paired difference of the
    second minus the first on the same items (and the quantized builds both ran) and what its interval
    says: which of the two is better, or that the items cannot tell them apart (the interval holds 0)."""
    tuned = {m: reps for m, reps in rows.items() if m != "gptq_magr"}
    est = {m: render.estimate_cell(reps, metric).est for m, reps in tuned.items()}
    ranked = sorted((m for m in tuned if est[m] is not None), key=lambda m: est[m])
    if metric not in LOWER_IS_BETTER:
        ranked.reverse()
    if len(ranked) < 3:
        return []
    lines = [
        "",
        f"Every two tuned methods on {name}, ranked best first by each row's estimate (over its own "
        "seeds); Δ = second − first, paired on the items and the quantized builds both ran (so its sign, "
        "not the ranking, says which is better where the rows ran different seeds):",
        "",
        "| first | second | Δ | the interval says |",
        "|---|---|---|---|",
    ]
    for i, a in enumerate(ranked):
        for b in ranked[i + 1 :]:
            diff = render.difference_cell(tuned[b], tuned[a], metric)
            if diff.ci is None:
                verdict = "no interval"
            elif diff.ci[0] <= 0 <= diff.ci[1]:
                verdict = "cannot tell apart"
            else:
                first_wins = (diff.ci[0] > 0) == (metric in LOWER_IS_BETTER)
                verdict = f"{a if first_wins else b} better"
            lines.append(f"| {a} | {b} | {render.fmt_cell(diff, metric, signed=True)} | {verdict} |")
    return lines


def _uniform_guess(rows: dict[str, list[dict]]) -> dict[str, float]:
    """Each CSQA task's expected accuracy when guessing uniformly among each document's choices (the mean
    of 1 / number of choices over the scored documents, read from the first row with per-item records:
    every row scored the same documents)."""
    for reps in rows.values():
        recs = render.item_records(reps[0], "csqa")
        if recs and all(r.get("ll") for r in recs):
            by_task: dict[str, list[float]] = defaultdict(list)
            for r in recs:
                by_task[r["task"]].append(1.0 / len(r["ll"]))
            return {t: sum(v) / len(v) for t, v in by_task.items()}
    return {}


def _per_task(rows: dict[str, list[dict]], order: list[str]) -> list[str]:
    """Markdown lines: each row's accuracy per CSQA task, each method's paired difference to QWHA per
    task, and what a uniform guess scores on the same documents (how far from chance each row is)."""
    tasks = [
        t
        for t in CSQA_TASKS
        if any(t in (r.get("csqa") or {}).get("tasks", {}) for v in rows.values() for r in v)
    ]
    if not tasks:
        return []
    lines = [
        "",
        "Per task (accuracy % [95%] k/n; Δ: paired on the task's documents); `uniform guess`: the accuracy "
        "of guessing uniformly among each document's choices, on the same documents:",
        "",
        "| row | " + " | ".join(tasks) + " | avg |",
        "|---|" + "---|" * (len(tasks) + 1),
    ]
    ref = rows.get(REFERENCE)
    for method in order:
        reps = rows[method]
        cells = [render.fmt_cell(render.estimate_cell(reps, "csqa", task=t), "em") for t in tasks]
        cells.append(render.fmt_cell(render.estimate_cell(reps, "csqa"), "csqa"))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    for method in order:
        if method == REFERENCE or ref is None:
            continue
        cells = [
            render.fmt_cell(render.difference_cell(rows[method], ref, "csqa", task=t), "csqa", signed=True)
            for t in tasks
        ]
        cells.append(render.fmt_cell(render.difference_cell(rows[method], ref, "csqa"), "csqa", signed=True))
        lines.append(f"| Δ {method} − {REFERENCE} | " + " | ".join(cells) + " |")
    guess = _uniform_guess(rows)
    if all(t in guess for t in tasks):
        mean = sum(guess[t] for t in tasks) / len(tasks)
        lines.append(
            "| uniform guess | "
            + " | ".join(f"{100 * guess[t]:.1f}" for t in tasks)
            + f" | {100 * mean:.1f} |"
        )
    return lines


def _quantizer(runs: render.Runs, key: str | None) -> str:
    """What a quantized-model build is, less its calibration seed: the quantizer's config, the base model
    and the calibration config without ``seed``. Another seed of a run re-draws its calibration windows and
    so quantizes anew; its build differs but its quantizer is the same. A build with no record: its key."""
    info = runs.manifest("quantize", key) if key else {}
    if not info:
        return f"build {key}"
    up = info.get("upstream") or {}
    calib = dict((runs.manifest("calib", up.get("calib")) or {}).get("config") or {})
    calib.pop("seed", None)
    return json.dumps([info.get("config"), up.get("base"), calib], sort_keys=True)


def report(runs: render.Runs, model: str, bits: int) -> str:
    """Markdown: the test-set rows of the campaign, each method at its chosen rate (seeds as replicates),
    with n and 95% intervals, and each row's paired difference to QWHA on the same items.

    Rows: the runs with test-suite results (not the sweep's) made with the sweep's quantizer (any
    calibration seed: a seed re-draws the calibration windows, see :func:`_quantizer`), whose fine-tune
    rate is the one ``select`` chose for their method; GPTQ alone likewise."""
    found = heldout_results(runs, model, bits)
    lines = [
        f"# The decisive comparison: {model}, {bits}-bit, each method at its own selected learning rate",
        "",
        "`experiments/decisive.py report` writes this file from the archived records. Rates: "
        f"`lr_selection_{model}_{bits}bit.md`. {render.CELL_NOTE}",
        "",
    ]
    for data in DATA:
        chosen = {m: select(by_rate) for (m, d), by_rate in found.items() if d == data}
        if not chosen:
            continue
        quantizers = {
            _quantizer(runs, (r.get("upstream") or {}).get("quantize"))
            for (m, d), by_rate in found.items()
            if d == data
            for r in by_rate.values()
        }
        suite, metrics = ("gsm8k", ("ppl", "em")) if data == "gsm8k" else ("csqa", ("csqa",))
        kept = []
        for res in render.eval_runs(runs, model):
            if suite not in res or res.get("data") != data or int(res.get("bits", -1)) != bits:
                continue
            if _quantizer(runs, (res.get("upstream") or {}).get("quantize")) not in quantizers:
                continue
            method, lr = preset_of(res, model, bits), _run_lr(res, runs)
            at_chosen = method in chosen and lr is not None and math.isclose(lr, chosen[method], rel_tol=1e-6)
            if (method == "gptq_magr" and lr is None) or at_chosen:
                kept.append({**res, "_row": method})
        # one result per seed, as Table 3 picks it (per-item records, most items, newest)
        rows = render.replicates_by_row(kept, suite, lambda r: r["_row"])
        names = {"ppl": "GSM8K answer ppl", "em": "GSM8K EM", "csqa": "CSQA avg"}
        lines += [f"## {data}-style fine-tuning", ""]
        if not rows:
            lines += [f"No test rows yet; swept so far: {', '.join(sorted(chosen))}.", ""]
            continue
        head = "| method | lr | seeds | " + " | ".join(f"{names[m]} | Δ {names[m]} vs qwha" for m in metrics)
        lines += [
            head + " |",
            "|---|---|---|" + "---|---|" * len(metrics),
        ]
        order = ["gptq_magr", REFERENCE] + sorted(m for m in rows if m not in ("gptq_magr", REFERENCE))
        for method in (m for m in order if m in rows):
            reps = rows[method]
            cells = []
            for metric in metrics:
                cells.append(render.fmt_cell(render.estimate_cell(reps, metric), metric))
                ref = rows.get(REFERENCE, [])
                diff = render.difference_cell(reps, ref, metric) if method != REFERENCE else None
                cells.append("–" if diff is None else render.fmt_cell(diff, metric, signed=True))
            lr = "–" if method == "gptq_magr" else _lr(chosen[method])
            seeds = ",".join(str(r.get("seed")) for r in reps) if method != "gptq_magr" else "–"
            lines.append(f"| {method} | {lr} | {seeds} | " + " | ".join(cells) + " |")
        if suite == "csqa":
            lines += _per_task(rows, [m for m in order if m in rows])
        lines += _per_seed(rows, metrics, names)
        lines += _pairwise(rows, metrics[0], names[metrics[0]])
        missing = sorted(set(chosen) - set(rows))
        if missing:
            lines += ["", f"Not yet evaluated on the test items at their chosen rate: {', '.join(missing)}."]
        lines.append("")
    return "\n".join(lines)


def eval_key(args: list[str], cache: Path) -> str:
    """The eval stage's key of one command (``dry_run=true``: composes and hashes, computes nothing)."""
    out = subprocess.run(
        [sys.executable, "-m", "qwha", *args, "dry_run=true"],
        check=True,
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "QWHA_CACHE_PATH": str(cache)},
    ).stdout
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "eval":
            return parts[1]
    raise RuntimeError(f"no eval key in the dry run of {' '.join(args)}:\n{out}")


def _run_all(commands: list[list[str]], cache: Path, dry_run: bool, runs: Path = render.RUNS_DIR) -> None:
    """Run each command unless its evaluation is already archived under ``runs`` (so a campaign resumes
    on a fresh machine from the archive, not only from the stage cache); archive after each."""
    for i, args in enumerate(commands, 1):
        line = f"[{i}/{len(commands)}] python -m qwha " + " ".join(args)
        if dry_run:
            print(line, flush=True)
            continue
        key = eval_key(args, cache)
        if (runs / "eval" / key / "results.json").is_file():
            print(f"{line}\n  archived already (eval {key}): skipped", flush=True)
            continue
        print(line, flush=True)
        subprocess.run([sys.executable, "-m", "qwha", *args], check=True, cwd=ROOT)
        n = render.archive(cache, runs)
        print(f"archived {n} artifacts", flush=True)


def _table_path(runs_dir: str, name: str, model: str, bits: int) -> Path:
    """Where a campaign table is committed: beside the archived records (``experiments/results/``)."""
    return Path(runs_dir).parent / f"{name}_{model}_{bits}bit.md"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("step", choices=("sweep", "select", "seeds", "report", "all", "tables"))
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--data", default=",".join(DATA))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--factors", default="1/3,1,3", help="multiples of each recipe's learning rate")
    ap.add_argument("--cache", default=os.environ.get("QWHA_CACHE_PATH", ".cache/qwha"))
    ap.add_argument("--runs", default=str(render.RUNS_DIR), help="archived records the selection reads")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    ap.add_argument(
        "--shard",
        default="1/1",
        help="K/N: run every N-th command from the K-th (one worker per core: --shard 1/2 and --shard 2/2; "
        "a run the other worker is building is waited for and reused)",
    )
    args = ap.parse_args(argv)
    try:
        k, n = (int(v) for v in args.shard.split("/"))
        if not 1 <= k <= n:
            raise ValueError
    except ValueError:
        ap.error(f"--shard={args.shard!r}: K/N with 1 <= K <= N, e.g. 1/2")

    def shard(commands: list[list[str]]) -> list[list[str]]:
        return commands[k - 1 :: n]

    methods, data_sets = args.methods.split(","), args.data.split(",")
    try:
        factors = [float(Fraction(f)) for f in args.factors.split(",")]  # "1/3" -> 0.333...
        seeds = [int(s) for s in args.seeds.split(",")]
    except (ValueError, ZeroDivisionError):
        ap.error(
            f"--factors={args.factors!r} / --seeds={args.seeds!r}: comma-separated numbers (1/3 allowed)"
        )
    if any(not math.isfinite(f) or f <= 0 for f in factors):
        ap.error(f"--factors={args.factors}: positive numbers")
    cache = Path(args.cache)
    if args.step == "tables":  # `make render`: every bit width's selection and report, running nothing
        runs = render.Runs(args.runs)
        for bits in swept_bits(runs, args.model):
            for name, text in (
                ("lr_selection", selection_table(heldout_results(runs, args.model, bits), args.model, bits)),
                ("decisive", report(runs, args.model, bits)),
            ):
                out = _table_path(args.runs, name, args.model, bits)
                out.write_text(text)
                print(f"wrote {out}")
        return 0
    if args.step == "report":
        text = report(render.Runs(args.runs), args.model, args.bits)
        _table_path(args.runs, "decisive", args.model, args.bits).write_text(text)
        print(text)
        return 0
    if args.step in ("sweep", "all"):
        _run_all(
            shard(sweep_commands(args.model, args.bits, methods, data_sets, factors)),
            cache,
            args.dry_run,
            Path(args.runs),
        )
    if args.step == "sweep":
        return 0
    # the selection table lists every swept method (a run for a few methods must not shrink it); the
    # commands are for the methods and data sets asked for
    every = heldout_results(render.Runs(args.runs), args.model, args.bits)
    found = {k: v for k, v in every.items() if k[0] in methods and k[1] in data_sets}
    if not found:
        print(
            f"select: no sweep records for {args.model} at {args.bits} bits in {args.runs}", file=sys.stderr
        )
        return 1 if not args.dry_run else 0
    text = selection_table(every, args.model, args.bits)
    _table_path(args.runs, "lr_selection", args.model, args.bits).write_text(text)
    print(text)
    if args.step == "select":
        return 0
    _run_all(shard(seed_commands(found, args.model, args.bits, seeds)), cache, args.dry_run, Path(args.runs))
    if args.step == "all" and not args.dry_run:
        render.main(["table3", "--model", args.model, "--cache", str(cache)])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
