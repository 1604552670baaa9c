"""The table renderer reads what the stages write: init artifacts found through their manifests."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from experiments import render
from qwha.cache import StageCache
from qwha.eval import stats
from qwha.eval.records import records_file, write_records
from qwha.pipeline import stage_key
from qwha.stages import get_stage
from tests.conftest import compose


def _fake_pipeline(
    cache: StageCache,
    overrides: list[str],
    summary: dict,
    results: dict | None = None,
    records: dict[str, list[dict]] | None = None,
) -> dict[str, str]:
    """Artifacts base -> calib -> quantize -> init (-> finetune -> eval when ``results`` is given) with the
    real keys and manifests; fake contents; ``records``: per-item records of the eval artifact by suite.
    Returns the keys."""
    cfg = compose("budget=small", "quant.cd_iters=auto", *overrides)  # as the tables run: Table 3's quantizer
    keys: dict[str, str] = {}
    stages = ("base", "calib", "quantize", "init") + (("finetune", "eval") if results is not None else ())
    for name in stages:
        ups = {u: keys[u] for u in get_stage(name).upstream(cfg)}
        key, slice_ = stage_key(name, cfg, ups)

        def fn(out, name=name):
            if name == "init":
                (out / "report.json").write_text(json.dumps({"summary": summary}))
            if name == "finetune":
                return {"step_time_s": 2.5, "tokens_per_s": 100.0, "effective_batch": 8}
            if name == "eval":
                res = {
                    "model": cfg.model.name,
                    "target": "finetune",
                    "bits": cfg.bits,
                    "seed": cfg.seed,
                    "method_name": cfg.method_name,
                    "data": cfg.data.name,
                }
                files = {}
                for suite, recs in (records or {}).items():
                    files[suite] = records_file(suite)
                    write_records(out / files[suite], recs)
                (out / "results.json").write_text(json.dumps({**res, **results, "records": files}))
            return {}

        if cache.lookup(name, key) is None:
            cache.build(name, key, fn, config=slice_, upstream=ups)
        keys[name] = key
    return keys


def test_table2_rows_from_cached_init_artifacts(cache_root):
    cache = StageCache(cache_root)
    _fake_pipeline(cache, ["init=qwha", "bits=2"], {"layer_error_relative": 0.41, "heldout_ppl": 110.0})
    _fake_pipeline(
        cache,
        ["init=qwha", "init.refine=false", "bits=2"],
        {"layer_error_relative": 0.77, "heldout_ppl": 900.0},
    )
    _fake_pipeline(cache, ["init=qwha_reference", "bits=4"], {"layer_error_relative": 0.5})
    _fake_pipeline(cache, ["init=magnitude", "bits=4"], {"layer_error_relative": 0.45})
    _fake_pipeline(cache, ["init=magnitude", "bits=4", "model=llama3.2-3b"], {"layer_error_relative": 0.1})
    runs = render.init_runs(cache_root, "smollm2-135m")
    info = sorted((r["run"]["bits"], r["run"]["init"], r["run"]["refine"]) for r in runs)
    assert info == [
        (2, "qwha", False),
        (2, "qwha", True),
        (4, "magnitude", True),
        (4, "qwha_reference", True),
    ]
    text = render.table2(cache_root, "smollm2-135m")
    assert "| 2 | 12 | qwha | True | 0.4100 |" in text and "| 110.0 | 3.86 |" in text  # paper: AdaAlloc 3.86
    assert "| 2 | 12 | qwha | False | 0.7700 |" in text and "| 7.06 |" in text  # paper: no refinement 7.06
    assert "4 runs (cache and archived records)" in text


def test_fig_rank_series_and_png_and_table2_keeps_its_rank(cache_root, tmp_path):
    cache = StageCache(cache_root)
    errors = {("qwha", 8): 0.8, ("qwha", 12): 0.41, ("cloq", 8): 0.9, ("cloq", 12): 0.6}
    for (method, r), err in errors.items():
        _fake_pipeline(cache, [f"method={method}", f"rank={r}", "bits=2"], {"layer_error_relative": err})
    _fake_pipeline(cache, ["init=magnitude", "rank=8", "bits=2"], {"layer_error_relative": 0.7})
    text = render.fig_rank(cache_root, "smollm2-135m", out=tmp_path)
    for (method, r), err in errors.items():
        assert f"| 2 | {method} | {r} | {err:.4f} |" in text
    assert "magnitude" not in text and "4 runs (cache and archived records)" in text
    png = tmp_path / "fig_rank_smollm2-135m.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = render.table2(cache_root, "smollm2-135m")
    # SmolLM2's table rank is r = 12 (the density of Llama-3.2-3B at r = 64): the r = 8 runs stay out
    assert "| 2 | 12 | qwha | True | 0.4100 |" in table
    assert "0.8000" not in table and "0.7000" not in table


def test_ablation_tables_join_init_and_eval_rows(cache_root):
    """Tables 4 / 13 / 14 put each init's own numbers beside the evaluation of the model tuned from it,
    keep only the runs of their sweep, and print the paper's number at the paper's bit width only."""
    cache = StageCache(cache_root)
    gsm = {
        "gsm8k": {"exact_match": 0.04, "correct": 2, "n": 50, "answer_nll": {"ppl": 3.214}},
        "perplexity": {"ppl": 41.5},
    }
    _fake_pipeline(cache, ["method=qwha", "bits=4"], {"layer_error_relative": 0.5, "heldout_ppl": 37.6}, gsm)
    _fake_pipeline(cache, ["method=qwha", "bits=4", "init.temperature=0.5"], {"layer_error_relative": 0.55})
    _fake_pipeline(cache, ["method=qwha", "bits=2", "init.temperature=0.5"], {"layer_error_relative": 0.42})
    _fake_pipeline(
        cache, ["method=qwha", "bits=4", "adapter=dca", "init=random"], {"layer_error_relative": 0.8}
    )
    _fake_pipeline(cache, ["method=qwha", "bits=4", "init.refine=false"], {"layer_error_relative": 0.9})
    _fake_pipeline(cache, ["method=cloq", "bits=4"], {"layer_error_relative": 0.6})

    t13 = render.table13(cache_root, "smollm2-135m")
    # 2/50 without per-item records: Wilson interval from the counts (0.0110 to 0.1346), marked
    assert (
        "| 4 | 12 | 1 | 0.5000 | 37.6 | 4.0 [1.1, 13.5] 2/50 † | 3.21, no per-item records | 41.5 | – "
        "| 41.47 |" in t13
    )
    assert "| 4 | 12 | 0.5 | 0.5500 | – | – | – | – | – | 41.39 |" in t13
    assert "| 2 | 12 | 0.5 | 0.4200 | – | – | – | – | – | – |" in t13  # the paper's t sweep is 4-bit only
    assert "0.9000" not in t13 and "0.6000" not in t13 and "0.8000" not in t13  # unrefined, CLoQ, DCT

    t4 = render.table4(cache_root, "smollm2-135m")
    rows = [line for line in t4.splitlines() if line.startswith("| 4 |")]
    assert rows == [
        "| 4 | 12 | wht | qwha | 0.5000 | 37.6 | 4.0 [1.1, 13.5] 2/50 † | 3.21, no per-item records "
        "| 41.5 | – |",
        "| 4 | 12 | dct | random | 0.8000 | – | – | – | – | – |",
    ]  # t = 0.5 and the unrefined init are other tables' rows

    t14 = render.table14(cache_root, "smollm2-135m")
    # t = 0.5 is not Table 14's
    assert "| 4 | 12 | 64 | 0.5000 |" in t14 and "| 2 | 12 | 64 | 0.4200 |" not in t14


def test_table5_names_methods_from_their_init(cache_root):
    cache = StageCache(cache_root)
    res = {"gsm8k": {"exact_match": 0.0, "correct": 0, "n": 50}}
    _fake_pipeline(cache, ["method=qwha", "bits=4", "data=gsm8k"], {"layer_error_relative": 0.5}, res)
    _fake_pipeline(cache, ["method=lota", "bits=2", "data=gsm8k"], {}, res)
    text = render.table5(cache_root, "smollm2-135m")
    assert "| qwha | 4 | gsm8k |" in text and "| 2.5 | 8 | 100 |" in text
    import torch

    machine = f"CPU {torch.backends.cpu.get_cpu_capability()} x{torch.get_num_threads()}"
    if torch.cuda.is_available():
        machine = torch.cuda.get_device_name()
    assert f"| {machine} |" in text  # the fine-tuning manifest's machine record
    assert "| 18.2 / 3.9 | 0.66 / 1.34 |" in text  # the paper's QWHA training and init hours
    assert "| lota | 2 | gsm8k |" in text  # LoTA's ternary init is named by its method


def test_machine_label():
    assert render.machine_label(None) == "–"
    assert render.machine_label({"gpu": "NVIDIA H100 80GB HBM3", "cpu_capability": "AVX512"}) == (
        "NVIDIA H100 80GB HBM3"
    )
    assert render.machine_label({"gpu": None, "cpu_capability": "AVX2", "torch_threads": 1}) == "CPU AVX2 x1"


def test_archived_records_render_the_same_tables_and_the_cache_wins(cache_root, tmp_path):
    """`archive` keeps each artifact's JSON records (no weights); tables rendered from the archive alone
    equal those rendered from the cache, and a key present in both is read from the cache."""
    cache = StageCache(cache_root)
    gsm = {"gsm8k": {"exact_match": 0.04, "correct": 2, "n": 50}, "perplexity": {"ppl": 41.5}}
    keys = _fake_pipeline(cache, ["method=qwha", "bits=4"], {"layer_error_relative": 0.5}, gsm)
    _fake_pipeline(cache, ["method=cloq", "bits=2"], {"layer_error_relative": 0.6}, gsm)
    (cache_root / "calib" / keys["calib"] / "calib.pt").write_bytes(b"weights stay out")
    runs_dir = tmp_path / "runs"
    assert render.archive(cache_root, runs_dir) == 2 * 6 - 2  # the two chains share base and calib
    assert not list(runs_dir.rglob("calib.pt"))
    assert (runs_dir / "eval" / keys["eval"] / "results.json").exists()

    expected = {name: render.RENDERERS[name](cache_root, "smollm2-135m") for name in ("table3", "table4")}
    archived_only = render.Runs(tmp_path / "gone", runs_dir)
    for name, text in expected.items():
        assert render.RENDERERS[name](archived_only, "smollm2-135m") == text
    row = "| 4 | 12 | wht | qwha | 0.5000 | – | 4.0 [1.1, 13.5] 2/50 † | – | 41.5 | – |"
    assert row in expected["table4"]

    # A newer run of the same key in the cache (here: a changed report) takes precedence over the archive.
    report = cache_root / "init" / keys["init"] / "report.json"
    report.write_text(json.dumps({"summary": {"layer_error_relative": 0.25}}))
    both = render.Runs(cache_root, runs_dir)
    assert "| 4 | 12 | wht | qwha | 0.2500 |" in render.table4(both, "smollm2-135m")
    assert "| 4 | 12 | wht | qwha | 0.5000 |" in render.table4(render.Runs(runs_dir), "smollm2-135m")


def test_repeat_quant_compare_hand_worked():
    from experiments.repeat_quant import compare

    first = {
        "hashes": {"a.qweight": "x", "a.scales": "y", "b.qweight": "z"},
        "dw_x": {"m.layers.0.q": 2.0, "m.layers.0.k": 4.0, "m.layers.1.q": 10.0},
    }
    other = {
        "hashes": {"a.qweight": "x", "a.scales": "changed", "b.qweight": "z"},
        "dw_x": {"m.layers.0.q": 2.0, "m.layers.0.k": 5.0, "m.layers.1.q": 9.0},
    }
    same, diffs = compare(first, other)
    assert same == 2
    assert diffs == {0: (0.125, 0.25), 1: (0.1, 0.1)}  # median of (0, 1/4); |9 - 10| / 10


def _rebuild(cache: StageCache, stage: str, key: str, content: str) -> None:
    """Publish another build of (stage, key), same config and upstream, with a file of ``content``."""
    info = json.loads((cache.path(stage, key) / "manifest.json").read_text())
    cache.build(
        stage,
        key,
        lambda out: (out / "weights.bin").write_text(content) and None,
        config=info["config"],
        upstream=info["upstream"],
        replace=True,  # publishing keeps an intact artifact unless told to replace it (force=true)
    )


def test_rows_built_on_another_build_of_their_upstream_are_left_out(cache_root, tmp_path):
    """A quantized model re-made under the same key (another machine) differs in its bytes; the init and
    eval records built on the old one must not be shown beside records built on the new one."""
    cache = StageCache(cache_root)
    gsm = {"gsm8k": {"exact_match": 0.04, "correct": 2, "n": 50}}
    keys = _fake_pipeline(cache, ["method=qwha", "bits=4"], {"layer_error_relative": 0.5}, gsm)
    init_manifest = json.loads((cache.path("init", keys["init"]) / "manifest.json").read_text())
    assert set(init_manifest["upstream_builds"]) == {"base", "calib", "quantize"}
    assert "| 4 | 12 | wht | qwha | 0.5000 |" in render.table4(cache_root, "smollm2-135m")
    assert "| qwha | 4 | – | – | 4.0 [1.1, 13.5] 2/50 † |" in render.table3(cache_root, "smollm2-135m")

    _rebuild(cache, "quantize", keys["quantize"], "another machine's rounding")
    assert render.init_runs(cache_root, "smollm2-135m") == []
    assert "| 4 | 12 | wht | qwha |" not in render.table4(cache_root, "smollm2-135m")
    # eval -> finetune -> init: the eval record is stale too
    assert "| qwha | 4 |" not in render.table3(cache_root, "smollm2-135m")

    # Rebuilding the init on the new quantized model brings the row back (eval still stale: its finetune
    # was built on the old init).
    _rebuild(cache, "init", keys["init"], "init on the new model")
    report = {"summary": {"layer_error_relative": 0.3}}
    (cache.path("init", keys["init"]) / "report.json").write_text(json.dumps(report))
    assert "| 4 | 12 | wht | qwha | 0.3000 | – | – |" in render.table4(cache_root, "smollm2-135m")
    assert "| qwha | 4 |" not in render.table3(cache_root, "smollm2-135m")


def test_records_without_upstream_builds_fall_back_to_creation_times(tmp_path):
    """Older manifests do not name their upstream builds: an upstream record created after the record
    itself cannot be the one it read."""
    runs = render.Runs(tmp_path)

    def write(stage, key, created, upstream=None):
        folder = tmp_path / stage / key
        folder.mkdir(parents=True)
        info = {"status": "complete", "created": created, "upstream": upstream or {}}
        (folder / "manifest.json").write_text(json.dumps(info))

    write("quantize", "q", "2026-11-23T18:22:31+0000")
    write("init", "old", "2026-11-23T14:40:00+0000", {"quantize": "q"})
    write("init", "new", "2026-11-23T18:30:00+0000", {"quantize": "q"})
    write("init", "orphan", "2026-11-23T10:00:00+0000", {"quantize": "missing"})
    assert [path.name for path, _ in runs.complete("init")] == ["new", "orphan"]
    assert render._created({"created": "2026-11-23T18:22:31+0100"}) == render._created(
        {"created": "2026-11-23T17:22:31+0000"}
    )


def test_table2_fig_rank_and_table5_leave_out_the_temperature_and_group_sweeps(cache_root):
    cache = StageCache(cache_root)
    res = {"gsm8k": {"exact_match": 0.0, "correct": 0, "n": 50}}
    _fake_pipeline(cache, ["method=qwha", "bits=2"], {"layer_error_relative": 0.42}, res)
    t_half = ["method=qwha", "bits=2", "init.temperature=0.5"]
    _fake_pipeline(cache, t_half, {"layer_error_relative": 0.43}, res)
    _fake_pipeline(cache, ["method=qwha", "bits=2", "group_size=32"], {"layer_error_relative": 0.44}, res)
    _fake_pipeline(cache, ["method=cloq", "bits=2"], {"layer_error_relative": 0.56})  # no temperature
    t2 = render.table2(cache_root, "smollm2-135m")
    assert "| 2 | 12 | qwha | True | 0.4200 |" in t2 and "0.4300" not in t2 and "0.4400" not in t2
    fig = render.fig_rank(cache_root, "smollm2-135m")
    # the embedded model's default rank is 12 (the density of Llama-3.2-3B at r = 64)
    assert "| 2 | qwha | 12 | 0.4200 |" in fig and "| 2 | cloq | 12 | 0.5600 |" in fig
    assert "0.4300" not in fig and "0.4400" not in fig
    assert render.table5(cache_root, "smollm2-135m").count("| qwha | 2 | gsm8k |") == 1


def _csqa_records(correct: dict[str, list[int]]) -> tuple[dict, list[dict]]:
    """CSQA results (aggregates) and per-document records from each task's 0/1 list (doc ids 0, 1, ...)."""
    recs = [
        {"task": t, "doc_id": i, "gold": 0, "ll": [0.0, -1.0], "acc": c, "correct": c}
        for t, cs in correct.items()
        for i, c in enumerate(cs)
    ]
    tasks = {t: {"value": sum(cs) / len(cs), "n": len(cs)} for t, cs in correct.items()}
    return {"csqa": {"tasks": tasks, "average": float(np.mean([v["value"] for v in tasks.values()]))}}, recs


def _gsm_records(correct: list[int], nll: list[float], tokens: list[int]) -> tuple[dict, list[dict]]:
    recs = [{"id": i, "nll": v, "tokens": t} for i, (v, t) in enumerate(zip(nll, tokens, strict=True))]
    for i, c in enumerate(correct):
        recs[i].update(generation="...", pred="1", gold="1" if c else "2", correct=c)
    ppl = math.exp(sum(nll) / sum(tokens))
    res = {"exact_match": sum(correct) / len(correct), "correct": sum(correct), "n": len(correct)}
    return {"gsm8k": {**res, "answer_nll": {"ppl": ppl, "n": len(nll)}}}, recs


def _row(text: str, method: str, bits: int) -> list[str]:
    line = next(x for x in text.splitlines() if x.startswith(f"| {method} | {bits} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_table3_cells_from_per_item_records_hand_worked(cache_root):
    """Exact match 3/10 -> Wilson; answer ppl exp(sum nll / sum tokens); an identical row's paired
    difference is exactly 0; the CSQA average is the mean of the task accuracies."""
    cache = StageCache(cache_root)
    corr = [1, 1, 1, 0, 0, 0, 0, 0, 0, 0]
    nll, tok = [float(v) for v in range(1, 21)], [10] * 20
    res, recs = _gsm_records(corr, nll, tok)
    _fake_pipeline(cache, ["method=qwha", "bits=2"], {}, res, {"gsm8k": recs})
    _fake_pipeline(cache, ["method=cloq", "bits=2"], {}, res, {"gsm8k": recs})  # the same answers
    better = [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]
    res2, recs2 = _gsm_records(better, [v - 1.0 for v in nll], tok)  # 1 nat less on every item
    _fake_pipeline(cache, ["method=ssh", "bits=2"], {}, res2, {"gsm8k": recs2})
    text = render.table3(cache_root, "smollm2-135m")
    q = _row(text, "qwha", 2)
    lo, hi = stats.wilson_interval(3, 10)
    assert q[4] == f"30.0 [{100 * lo:.1f}, {100 * hi:.1f}] 3/10" and q[5] == "–"
    ppl = math.exp(210 / 200)
    assert q[6].startswith(f"{ppl:.2f} [") and q[6].endswith(" n=20")
    c = _row(text, "cloq", 2)
    assert c[5] == "+0.0 [+0.0, +0.0] n=10" and c[7] == "+0.00 [+0.00, +0.00] n=20"
    s = _row(text, "ssh", 2)
    # 2 of 10 items flip to correct, none back: a resample's difference is Binomial(10, 0.2) / 10, whose
    # 2.5% and 97.5% quantiles are 0 (P(0) = 0.107) and 5 (P(<= 4) = 0.967, P(<= 5) = 0.994).
    assert s[5] == "+20.0 [+0.0, +50.0] n=10"
    d = math.exp(190 / 200) - ppl  # every item 1 nat lower: the paired interval sits below 0
    assert s[7].startswith(f"{d:.2f} [".replace("-", "−")) and s[7].endswith("n=20")
    lo_d, hi_d = (float(x.replace("−", "-")) for x in s[7].split("[")[1].split("]")[0].split(","))
    assert lo_d < d < hi_d < 0


def test_table3_csqa_average_and_per_task_cells(cache_root):
    cache = StageCache(cache_root)
    res, recs = _csqa_records({"boolq": [1, 0, 1, 1], "piqa": [1, 1, 0, 0, 0, 0, 1, 1]})
    _fake_pipeline(cache, ["method=qwha", "bits=4", "data=alpaca"], {}, res, {"csqa": recs})
    text = render.table3(cache_root, "smollm2-135m")
    q = _row(text, "qwha", 4)
    assert q[2].startswith("62.5 [") and q[2].endswith(" n=12")  # (3/4 + 4/8) / 2
    lo, hi = stats.wilson_interval(3, 4)
    per_task = [x for x in text.splitlines() if x.startswith("| qwha | 4 |")][-1]
    assert f"| 75.0 [{100 * lo:.1f}, {100 * hi:.1f}] 3/4 | 50.0 [" in per_task


def test_rows_on_other_quantized_models_are_not_paired(cache_root):
    """Another seed draws another calibration sample, hence another quantized model: its row is shown
    with its own interval but not paired with QWHA's."""
    cache = StageCache(cache_root)
    res, recs = _gsm_records([1, 0, 0, 0], [1.0, 2.0, 3.0, 4.0], [5] * 4)
    _fake_pipeline(cache, ["method=qwha", "bits=2"], {}, res, {"gsm8k": recs})
    _fake_pipeline(cache, ["method=cloq", "bits=2", "seed=1"], {}, res, {"gsm8k": recs})
    c = _row(render.table3(cache_root, "smollm2-135m"), "cloq", 2)
    assert c[4].endswith("1/4") and c[5] == "not paired: another quantized-model build"


def test_seeds_are_replicates(cache_root):
    """Two seeds of each row: the cell is the mean over seeds, n says x2, and the difference is paired
    over items with both rows built on the same two quantized models."""
    cache = StageCache(cache_root)
    for seed, corr in ((0, [1, 1, 0, 0]), (1, [1, 0, 0, 0])):
        res, recs = _gsm_records(corr, [1.0] * 4, [5] * 4)
        _fake_pipeline(cache, ["method=qwha", "bits=2", f"seed={seed}"], {}, res, {"gsm8k": recs})
        _fake_pipeline(cache, ["method=cloq", "bits=2", f"seed={seed}"], {}, res, {"gsm8k": recs})
    text = render.table3(cache_root, "smollm2-135m")
    q, c = _row(text, "qwha", 2), _row(text, "cloq", 2)
    assert q[4].startswith("37.5 [") and q[4].endswith(" n=4×2")  # (2/4 + 1/4) / 2
    assert c[5].startswith("+0.0 [") and c[5].endswith(" n=4×2")


def test_a_row_with_more_seeds_is_paired_on_the_seeds_both_ran(cache_root):
    """QWHA at seeds 0 and 1, CLoQ at seed 1 only: each seed quantizes anew, so the difference pairs CLoQ
    with QWHA's seed-1 run alone (hand-worked: 3/4 - 1/4 = +50 points on the same 4 items) and says so;
    pooling QWHA's seed 0 (2/4) in would have given +37.5."""
    cache = StageCache(cache_root)
    for seed, corr in ((0, [1, 1, 0, 0]), (1, [1, 0, 0, 0])):
        res, recs = _gsm_records(corr, [1.0] * 4, [5] * 4)
        _fake_pipeline(cache, ["method=qwha", "bits=2", f"seed={seed}"], {}, res, {"gsm8k": recs})
    res, recs = _gsm_records([1, 1, 1, 0], [1.0] * 4, [5] * 4)
    _fake_pipeline(cache, ["method=cloq", "bits=2", "seed=1"], {}, res, {"gsm8k": recs})
    c = _row(render.table3(cache_root, "smollm2-135m"), "cloq", 2)
    assert c[5].startswith("+50.0 [") and c[5].endswith(" n=4, on the shared quantized builds only")


def test_archive_copies_item_records_and_a_damaged_one_is_left_out(cache_root, tmp_path, capsys):
    cache = StageCache(cache_root)
    res, recs = _gsm_records([1, 0, 0, 0], [1.0, 2.0, 3.0, 4.0], [5] * 4)
    keys = _fake_pipeline(cache, ["method=qwha", "bits=2"], {}, res, {"gsm8k": recs})
    runs_dir = tmp_path / "runs"
    render.archive(cache_root, runs_dir)
    archived = runs_dir / "eval" / keys["eval"] / "records_gsm8k.jsonl.gz"
    assert (
        archived.read_bytes() == (cache_root / "eval" / keys["eval"] / "records_gsm8k.jsonl.gz").read_bytes()
    )
    only = render.Runs(runs_dir)
    assert render.table3(only, "smollm2-135m") == render.table3(cache_root, "smollm2-135m")
    write_records(archived, recs[:2])  # not the file the manifest names
    q = _row(render.table3(only, "smollm2-135m"), "qwha", 2)
    assert q[4].endswith("1/4 †") and q[6].endswith("no per-item records")  # back to the aggregates
    assert "is not the file its manifest names" in capsys.readouterr().err


@pytest.mark.parametrize("metric", ["csqa", "em"])
def test_unpaired_differences_from_aggregates(metric):
    """Old records (no items): Newcombe for exact match, a normal interval for the CSQA average."""
    if metric == "em":
        a = {"gsm8k": {"exact_match": 0.8, "correct": 56, "n": 70}}
        b = {"gsm8k": {"exact_match": 0.6, "correct": 48, "n": 80}}
        expected = (0.0524, 0.3339)  # Newcombe (1998), example (a)
    else:
        a = {"csqa": {"tasks": {"boolq": {"value": 0.5, "n": 100}, "piqa": {"value": 0.8, "n": 400}}}}
        b = {"csqa": {"tasks": {"boolq": {"value": 0.5, "n": 100}, "piqa": {"value": 0.8, "n": 400}}}}
        half = 1.959963984540054 * math.sqrt(0.0029) / 2 * math.sqrt(2)
        expected = (-half, half)
    cell = render.difference_cell([a], [b], metric)
    assert cell.ci == pytest.approx(expected, abs=6e-5) and "unpaired" in cell.note


def test_archiving_a_rebuilt_identical_upstream_keeps_older_records_valid(cache_root, tmp_path):
    """The same upstream built again (same key, same files, a later date) must not replace the archived
    record: older downstream records date their upstream by time and would all be dropped."""
    cache = StageCache(cache_root)
    gsm = {"gsm8k": {"exact_match": 0.04, "correct": 2, "n": 50}}
    keys = _fake_pipeline(cache, ["method=qwha", "bits=4"], {"layer_error_relative": 0.5}, gsm)
    runs_dir = tmp_path / "runs"
    render.archive(cache_root, runs_dir)
    for stage in ("finetune", "eval", "init", "quantize"):  # old-style downstream records: no build ids
        m = runs_dir / stage / keys[stage] / "manifest.json"
        info = json.loads(m.read_text())
        info.pop("upstream_builds", None)
        m.write_text(json.dumps(info))
    before = (runs_dir / "base" / keys["base"] / "manifest.json").read_text()
    rebuilt = cache_root / "base" / keys["base"] / "manifest.json"
    info = json.loads(rebuilt.read_text())
    info["created"] = "2099-01-01T00:00:00+0000"  # the rebuild, later than every record above
    rebuilt.write_text(json.dumps(info))
    render.archive(cache_root, runs_dir)
    assert (runs_dir / "base" / keys["base"] / "manifest.json").read_text() == before
    assert len(render.eval_runs(render.Runs(runs_dir), "smollm2-135m")) == 1
    # `make render` reads the cache first, whose rebuilt base is dated 2099: the old-style records were
    # built on the identical archived build, dated before them, so they still hold
    for stage in ("finetune", "eval", "init", "quantize"):
        m = cache_root / stage / keys[stage] / "manifest.json"
        info = json.loads(m.read_text())
        info.pop("upstream_builds", None)
        m.write_text(json.dumps(info))
    assert len(render.eval_runs(render.Runs(cache_root, runs_dir), "smollm2-135m")) == 1
    assert not render.eval_runs(render.Runs(cache_root), "smollm2-135m")  # the cache alone: no evidence
