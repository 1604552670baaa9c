"""The first-run summary: which runs print it, that its reference evaluations reuse the run's artifacts
and score the same items, and what the table and the reading line say for hand-made results."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from qwha.summary import (
    LABELS,
    Row,
    baseline_changes,
    reading,
    row_from_results,
    table,
    timing,
    variant,
    wanted,
)
from tests.conftest import compose


def results(ppl: float, answer_ppl: float, correct: int, n: int = 16, excluded: bool = False) -> dict:
    """An eval stage's results.json, written by hand."""
    return {
        "perplexity": {"ppl": ppl, "tokens": 4095},
        "gsm8k": {
            "exact_match": correct / n,
            "n": n,
            "correct": correct,
            "answer_nll": {"ppl": answer_ppl, "n": n, "tokens": 1234},
            "excluded_gsm_symbolic_templates": excluded,
        },
    }


def test_only_the_default_budget_of_the_embedded_model_compares():
    assert wanted(compose())
    assert not wanted(compose("budget=small"))
    assert not wanted(compose("stage=init"))
    assert not wanted(compose("~budget"))
    assert not wanted(compose("model=llama3.2-3b"))  # a hub model has no first_run block


def test_first_run_settings_stay_out_of_table_runs():
    default, small = compose(), compose("budget=small")
    assert default.quant.magr_solver == "fista" and default.quant.magr_iters < 200
    assert small.quant.magr_solver == "ista" and small.quant.magr_iters == 200  # the paper's MagR
    assert small.calib.n == default.calib.n == 32


def test_reference_evaluations_reuse_the_runs_artifacts(tmp_path):
    """Keys only (nothing computed): the quantized and initialized references share the run's quantize
    and init artifacts; only full precision needs its own (trivial) `quantize` artifact."""
    from qwha.cache import StageCache
    from qwha.pipeline import plan

    cfg = compose(f"cache_dir={tmp_path}")
    cache = StageCache(tmp_path)
    main = plan("eval", cfg, cache)
    changes = baseline_changes(results(1, 1, 0, excluded=True))
    assert list(changes) == list(LABELS[:3])
    quant = plan("eval", variant(cfg, changes["quantized"]), cache)
    init = plan("eval", variant(cfg, changes["initialized"]), cache)
    fp = plan("eval", variant(cfg, changes["full precision"]), cache)
    assert quant["quantize"]["key"] == main["quantize"]["key"] and "init" not in quant
    assert init["quantize"]["key"] == main["quantize"]["key"] and init["init"]["key"] == main["init"]["key"]
    assert fp["quantize"]["key"] != main["quantize"]["key"] and fp["base"]["key"] == main["base"]["key"]
    assert len({main["eval"]["key"], quant["eval"]["key"], init["eval"]["key"], fp["eval"]["key"]}) == 4
    # variant() copies: the run's own config is untouched.
    assert cfg.eval.target == "finetune" and "exclude_templates" not in cfg.eval.gsm8k


def test_same_items_as_the_tuned_model():
    """The reference rows change only what they evaluate, never which items are scored: the GSM8K
    questions left out are the tuned row's (the 100 template questions of the packaged training data)."""
    from qwha.stages.eval import gsm8k_exclude

    cfg = compose()
    assert gsm8k_exclude(cfg) == "gsm_symbolic"
    for changes in baseline_changes(results(1, 1, 0, excluded=True)).values():
        assert not any(k.startswith("eval.gsm8k") or k.startswith("eval.csqa") for k in changes)
        assert gsm8k_exclude(variant(cfg, changes)) == "gsm_symbolic"


def four_rows(tuned_ppl: float = 300.0) -> list[Row]:
    spec = {
        "full precision": (36.7, 3.1, 0),
        "quantized": (1113.0, 2312.0, 0),
        "initialized": (107.8, 20.5, 0),
        "tuned": (tuned_ppl, 6.0, 1),
    }
    return [row_from_results(k, results(*v)) for k, v in spec.items()]


def test_table_shows_every_metric_with_its_n():
    text = table(four_rows())
    lines = text.splitlines()
    assert lines[0].startswith("| model | held-out ppl (lower is better; n = 4,095 tokens)")
    assert "GSM8K answer ppl (lower is better; n = 16 solutions)" in lines[0]
    assert "GSM8K exact match (higher is better; n = 16 questions)" in lines[0]
    assert lines[2] == "| full precision | 36.70 | 3.10 | 0/16 |"
    assert lines[3] == "| quantized | 1,113.0 | 2,312.0 | 0/16 |"
    assert lines[5] == "| tuned | 300.0 | 6.00 | 1/16 |"


def test_table_flags_rows_scored_on_different_n():
    rows = four_rows()
    rows[0] = row_from_results("full precision", results(36.7, 3.1, 0, n=24))
    assert table(rows).splitlines()[-1] == (
        "(n differs between rows for GSM8K answer ppl, GSM8K exact match: compare with care)"
    )


def test_reading_tells_the_story_of_the_numbers():
    cfg = compose()
    line = reading(four_rows(), cfg)
    assert line.startswith("Reading: 2-bit quantization moves held-out perplexity from 36.7 to 1,113")
    assert "brings it back to 108 before any training" in line
    assert f"{cfg.train.max_steps} fine-tuning steps lower the GSM8K answer perplexity" in line
    assert "from 20.5 to 6.0" in line
    assert "rises (108 -> 300)" in line
    assert "exact match is 0/16 even at full precision" in line
    assert "\n" not in line
    calm = reading(four_rows(tuned_ppl=100.0), cfg)
    assert "rises" not in calm


def test_timing_counts_computed_stages_only():
    def art(secs):
        return SimpleNamespace(manifest={"wall_time_s": secs})

    done = {"base": (art(20.0), False), "quantize": (art(100.0), True), "eval": (art(40.0), False)}
    line = timing(done, {"eval (quantized)": (art(30.0), False)})
    assert line == "Time (s): base 20, eval 40, eval (quantized) 30; total 90 s (1.5 min)."
    assert timing({"base": (art(1.0), True)}, {}) == "Time: everything came from the cache."


@pytest.mark.parametrize("label", LABELS)
def test_labels_are_the_rows_in_order(label):
    assert [r.label for r in four_rows()].index(label) == LABELS.index(label)


def test_eval_metrics_reach_wandb(tmp_path):
    """An evaluation's numbers go to wandb as an `eval` run grouped with the training run."""
    import json

    from qwha.finetune.config import WandbConfig
    from qwha.finetune.tracking import log_eval
    from tests.test_finetune_trainer import _wandb_records

    res = {"model": "tiny", "target": "finetune", "bits": 2, **results(123.5, 7.25, 1)}
    res["gsm8k"]["samples"] = [{"id": 3, "pred": "4"}]  # lists are not metrics
    assert log_eval(WandbConfig("qwha-test", None, "disabled"), "tiny-wha", res, tmp_path, "finetune") == {}
    assert not (tmp_path / "wandb").exists()
    sent = log_eval(WandbConfig("qwha-test", None, "offline"), "tiny-wha", res, tmp_path, "finetune")
    assert sent["eval/perplexity/ppl"] == 123.5 and sent["eval/gsm8k/answer_nll/ppl"] == 7.25
    assert sent["eval/gsm8k/exact_match"] == 1 / 16 and "eval/bits" not in sent
    (log,) = Path(tmp_path, "wandb").glob("offline-run-*/run-*.wandb")
    records = _wandb_records(log)
    run = [r.run for r in records if r.WhichOneof("record_type") == "run"][0]
    assert run.project == "qwha-test" and run.display_name == "tiny-wha-eval-finetune"
    assert run.run_group == "tiny-wha" and run.job_type == "eval"
    key = lambda item: item.key or "/".join(item.nested_key)
    logged = {
        key(i): json.loads(i.value_json)
        for r in records
        if r.WhichOneof("record_type") == "history"
        for i in r.history.item
    }
    assert logged["eval/perplexity/ppl"] == 123.5 and logged["eval/gsm8k/answer_nll/ppl"] == 7.25
