"""The decisive campaign's steps: sweep commands, learning-rate selection from archived records, seed runs."""

from __future__ import annotations

import json
import math

import pytest

from experiments import decisive, render
from qwha.cache import StageCache
from qwha.eval.records import records_file, write_records


def _result_head(method: str, data: str, seed: int) -> dict:
    """The fields every fake eval result here shares: a fine-tuned SmolLM2 run at 2 bits."""
    return {
        "model": "smollm2-135m",
        "target": "finetune",
        "bits": 2,
        "seed": seed,
        "method_name": method,
        "data": data,
    }


def _sweep_record(
    cache: StageCache,
    method: str,
    data: str,
    lr: float,
    nll: list[float],
    seed: int = 0,
    quant: str | None = None,
):
    """An eval artifact as a sweep run leaves it: ``train_heldout`` aggregates and per-record losses (on
    quantized build ``quant`` where given)."""
    upstream = {"quantize": quant} if quant else {}
    tokens = [10] * len(nll)

    def fn(out):
        write_records(
            out / records_file("heldout"),
            [{"id": i, "nll": v, "tokens": t} for i, (v, t) in enumerate(zip(nll, tokens, strict=True))],
        )
        h = sum(nll) / sum(tokens)
        res = {
            **_result_head(method, data, seed),
            "train_heldout": {"nll": h, "ppl": math.exp(h), "tokens": sum(tokens), "n": len(nll), "lr": lr},
            "records": {"heldout": records_file("heldout")},
            "upstream": upstream,
        }
        (out / "results.json").write_text(json.dumps(res))
        return {}

    key = f"{method}-{data}-{lr:g}-{seed}"
    cache.build("eval", key, fn, config={"k": key}, upstream=upstream)


def _campaign(root) -> StageCache:
    cache = StageCache(root)
    losses = {
        ("qwha", "gsm8k"): {1e-4: 12.0, 3e-4: 9.0, 1e-3: 10.0},
        ("cloq", "gsm8k"): {1e-4: 11.0, 3e-4: 9.5, 1e-3: 9.5},  # a tie: the smaller rate
        ("ssh", "gsm8k"): {1e-4: 9.2, 3e-4: 15.0, 1e-3: 30.0},  # best baseline on gsm8k (9.2 < 9.5)
        ("qwha", "alpaca"): {1e-4: 20.0, 3e-4: 19.0, 1e-3: 25.0},
        ("cloq", "alpaca"): {1e-4: 18.0, 3e-4: 21.0, 1e-3: 22.0},
        ("shira", "gsm8k"): {1e-4: 30.0, 3e-4: 20.0, 1e-3: 15.0},  # best at the largest rate swept
    }
    for (method, data), by_rate in losses.items():
        for lr, mean in by_rate.items():
            _sweep_record(cache, method, data, lr, [mean + d for d in (-1.0, 0.0, 1.0, 0.5, -0.5)])
    _sweep_record(cache, "cloq", "gsm8k", 1e-2, [1.0] * 5, seed=1)  # another seed: not a sweep record
    return cache


def test_selection_picks_the_lowest_heldout_loss_and_the_best_baseline(tmp_path):
    cache = _campaign(tmp_path / "runs")
    found = decisive.heldout_results(render.Runs(cache.root), "smollm2-135m", 2)
    assert set(found[("cloq", "gsm8k")]) == {1e-4, 3e-4, 1e-3}  # the seed-1 record stays out
    assert decisive.select(found[("qwha", "gsm8k")]) == 3e-4
    assert decisive.select(found[("cloq", "gsm8k")]) == 3e-4  # 9.5 at 3e-4 and 1e-3: the smaller
    assert decisive.select(found[("ssh", "gsm8k")]) == 1e-4
    assert decisive.best_baseline(found, "gsm8k") == "ssh"
    assert decisive.best_baseline(found, "alpaca") == "cloq"

    cmds = [" ".join(c) for c in decisive.seed_commands(found, "smollm2-135m", 2, [0, 1, 2])]
    gsm = [c for c in cmds if "data=gsm8k" in c]
    assert sum("method=gptq_magr" in c for c in gsm) == 1
    assert [c for c in gsm if "method=qwha" in c] == [
        f"model=smollm2-135m budget=small method=qwha data=gsm8k bits=2 train.lr=0.0003 seed={s} "
        "eval.perplexity.enabled=false "  # as the sweep: the sweep's init and fine-tune are reused
        "quant.cd_iters=auto"  # the Table 3 quantizer, so these rows pair with `make table3`'s
        for s in (0, 1, 2)
    ]
    assert sum("method=ssh" in c for c in gsm) == 3 and sum("method=cloq" in c for c in gsm) == 1
    assert "method=cloq data=alpaca bits=2 train.lr=0.0001 seed=2" in " | ".join(cmds)  # alpaca's best

    table = decisive.selection_table(found, "smollm2-135m", 2)
    chosen = [line for line in table.splitlines() if "**yes**" in line]
    assert (
        len(chosen) == 6
        and "| gsm8k | qwha | 0.0003 | " in chosen[[c.split("|")[2] for c in chosen].index(" qwha ")]
    )
    # a chosen rate on the grid's edge says so (the sweep did not bracket the optimum); inside, it doesn't
    mark = {(c.split("|")[1].strip(), c.split("|")[2].strip()): c.split("|")[6].strip() for c in chosen}
    assert mark[("gsm8k", "qwha")] == "**yes**" and mark[("gsm8k", "cloq")] == "**yes**"
    assert "largest swept" in mark[("gsm8k", "shira")] and "smallest swept" in mark[("gsm8k", "ssh")]
    assert "smallest swept" in mark[("alpaca", "cloq")]
    # every record of rate 1e-3 is 1 nat (0.1 nat/token) above the chosen rate's: the paired interval
    # lies above 0
    line = next(x for x in table.splitlines() if x.startswith("| gsm8k | qwha | 0.001 |"))
    d = math.exp(10.0 / 10) - math.exp(9.0 / 10)
    lo = float(line.split("| +")[1].split("[+")[1].split(",")[0])
    assert f"| +{d:.2f} [+" in line and 0 < lo < d
    # versus QWHA at the chosen rates, paired: SSH's records are each 0.2 nat above QWHA's (gsm8k);
    # CLoQ's 1 nat below on alpaca
    versus = table.split("minus qwha at its own")[1]
    ssh = next(x for x in versus.splitlines() if x.startswith("| gsm8k | ssh | 0.0001 |"))
    assert f"+{math.exp(0.92) - math.exp(0.9):.2f} [+" in ssh
    cloq = next(x for x in versus.splitlines() if x.startswith("| alpaca | cloq | 0.0001 |"))
    assert f"−{math.exp(1.9) - math.exp(1.8):.2f} [−" in cloq and "| alpaca | qwha" not in versus


def test_sweep_centres_on_each_recipe_and_scores_no_test_item():
    cmds = decisive.sweep_commands("smollm2-135m", 2, ["qwha", "cloq"], ["gsm8k"])
    assert len(cmds) == 6
    for method in ("qwha", "cloq"):
        rates = [
            float(a.split("=")[1])
            for c in cmds
            if f"method={method}" in c
            for a in c
            if a.startswith("train.lr=")
        ]
        centre = decisive.recipe_lr("smollm2-135m", method, "gsm8k", 2)
        assert rates == pytest.approx([centre / 3, centre, centre * 3], rel=3e-3)  # 3 digits
    for c in cmds:
        assert {
            "eval.csqa.enabled=false",
            "eval.gsm8k.enabled=false",
            "eval.train_heldout.enabled=true",
        } <= set(c)
        assert "seed=0" in c


def test_main_dry_run_selects_from_the_archive(tmp_path, capsys):
    cache = _campaign(tmp_path / "results" / "runs")
    assert decisive.main(["select", "--runs", str(cache.root), "--methods", "qwha,cloq,ssh"]) == 0
    assert (tmp_path / "results" / "lr_selection_smollm2-135m_2bit.md").is_file()
    assert decisive.main(["seeds", "--runs", str(cache.root), "--dry-run", "--seeds", "0,1"]) == 0
    out = capsys.readouterr().out
    assert (
        "python -m qwha model=smollm2-135m budget=small method=ssh data=gsm8k bits=2 train.lr=0.0001 seed=1"
        in out
    )
    with pytest.raises(SystemExit):
        decisive.main(["select", "--factors", "a/b"])


def test_tables_rewrites_each_swept_bit_widths_selection_and_report_and_only_those(tmp_path, capsys):
    """``make render``'s step: the committed selection and report files come from the archive alone, for
    every bit width with sweep records (a stale file is rewritten), and none for a width never swept."""
    cache = _campaign(tmp_path / "results" / "runs")
    stale = tmp_path / "results" / "lr_selection_smollm2-135m_2bit.md"
    stale.write_text("stale\n")
    assert decisive.swept_bits(render.Runs(cache.root), "smollm2-135m") == [2]
    assert decisive.main(["tables", "--runs", str(cache.root)]) == 0
    runs = render.Runs(cache.root)
    assert stale.read_text() == decisive.selection_table(
        decisive.heldout_results(runs, "smollm2-135m", 2), "smollm2-135m", 2
    )
    report = tmp_path / "results" / "decisive_smollm2-135m_2bit.md"
    assert report.read_text() == decisive.report(runs, "smollm2-135m", 2)
    assert sorted(p.name for p in (tmp_path / "results").glob("*.md")) == [report.name, stale.name]


def test_a_run_for_some_methods_keeps_every_method_in_the_selection_table(tmp_path, capsys):
    """``seeds --methods ssh`` runs SSH's commands only, but the selection file it rewrites still lists
    every swept method and the best baseline over all of them (SSH here: 9.2 < CLoQ's 9.5)."""
    cache = _campaign(tmp_path / "results" / "runs")
    assert (
        decisive.main(["seeds", "--runs", str(cache.root), "--dry-run", "--methods", "ssh", "--seeds", "0"])
        == 0
    )
    table = (tmp_path / "results" / "lr_selection_smollm2-135m_2bit.md").read_text()
    assert {"| gsm8k | qwha |", "| gsm8k | cloq |", "| alpaca | cloq |"} <= {
        line[: len("| gsm8k | qwha |")] if line.startswith("| gsm8k") else line[: len("| alpaca | cloq |")]
        for line in table.splitlines()
    }
    assert "best baseline: **ssh**" in table
    commands = [line for line in capsys.readouterr().out.splitlines() if "python -m qwha" in line]
    assert commands and all("method=ssh" in c or "method=gptq_magr" in c for c in commands)


def test_loca_runs_recorded_as_loca_fixed_are_selected_and_rerun_as_the_loca_preset(tmp_path, capsys):
    """``method=loca`` at ``budget=small`` records its rows as ``loca_fixed`` (too short for a location
    step); ``seeds --methods loca`` must still find its sweep and rerun it as ``method=loca`` (there is
    no ``loca_fixed`` preset), and the report must keep its test run at the chosen rate."""
    cache = StageCache(tmp_path / "results" / "runs")
    for method in ("qwha", "loca_fixed"):
        for lr, mean in ((2e-4, 12.0), (6e-4, 9.0)):
            _sweep_record(cache, method, "gsm8k", lr, [mean] * 3, quant="b0")
    argv = ["seeds", "--runs", str(cache.root), "--dry-run", "--methods", "loca", "--seeds", "0"]
    assert decisive.main(argv) == 0
    commands = [line for line in capsys.readouterr().out.splitlines() if "python -m qwha" in line]
    assert any("method=loca data=gsm8k bits=2 train.lr=0.0006 seed=0" in c for c in commands)
    assert not any("loca_fixed" in c for c in commands)
    _test_eval(cache, "qwha", 6e-4, 0, "b0", [1, 0])
    _test_eval(cache, "loca_fixed", 6e-4, 0, "b0", [0, 0])
    text = decisive.report(render.Runs(cache.root), "smollm2-135m", 2)
    assert "| loca | 0.0006 | 0 |" in text and "Not yet evaluated" not in text
    _sweep_record(cache, "qwha", "alpaca", 2e-4, [10.0] * 3, quant="b0")  # swept, no test row: no table
    alpaca = decisive.report(render.Runs(cache.root), "smollm2-135m", 2).split("## alpaca")[1]
    assert "No test rows yet; swept so far: qwha." in alpaca and "| method |" not in alpaca


def test_run_all_skips_commands_whose_eval_is_archived(tmp_path, monkeypatch):
    """A campaign resumed on a fresh machine (empty stage cache) runs only what the archive lacks: the
    eval key of each command (from its dry run) is looked up under ``runs/eval/<key>/results.json``."""
    runs = tmp_path / "runs"
    (runs / "eval" / "aaaa").mkdir(parents=True)
    (runs / "eval" / "aaaa" / "results.json").write_text("{}")
    (runs / "eval" / "bbbb").mkdir(parents=True)  # a folder without results.json is not a finished run
    keys = {"method=qwha": "aaaa", "method=cloq": "bbbb", "method=ssh": "cccc"}
    monkeypatch.setattr(decisive, "eval_key", lambda args, cache: keys[args[0]])
    ran = []
    monkeypatch.setattr(decisive.subprocess, "run", lambda cmd, **kw: ran.append(cmd[3]))
    monkeypatch.setattr(decisive.render, "archive", lambda cache, dest: 0)
    decisive._run_all([["method=qwha"], ["method=cloq"], ["method=ssh"]], tmp_path / "cache", False, runs)
    assert ran == ["method=cloq", "method=ssh"]


def test_eval_key_is_the_dry_run_key(tmp_path):
    """``eval_key`` returns the key ``python -m qwha dry_run=true`` prints for the eval stage."""
    args = ["model=smollm2-135m", "budget=small", "method=qwha", "data=gsm8k", "bits=2", "seed=0"]
    k1 = decisive.eval_key(args, tmp_path)
    k2 = decisive.eval_key([*args[:-1], "seed=1"], tmp_path)
    assert len(k1) == 16 and int(k1, 16) >= 0 and k1 != k2
    assert k1 == decisive.eval_key(list(args), tmp_path)


def test_seed_runs_put_the_paired_comparison_first(tmp_path):
    """GPTQ alone, QWHA and the best baseline (seed 0) come before the other methods, and the extra seeds
    last, so a campaign cut short has the comparison that decides the question."""
    found = decisive.heldout_results(render.Runs(_campaign(tmp_path / "c").root), "smollm2-135m", 2)
    gsm = [c for c in decisive.seed_commands(found, "smollm2-135m", 2, [0, 1, 2]) if "data=gsm8k" in c]
    methods = [" ".join(a for a in c if a.startswith(("method=", "seed="))) for c in gsm]
    assert methods == [
        "method=gptq_magr",
        "method=qwha seed=0",
        "method=ssh seed=0",
        "method=cloq seed=0",
        "method=shira seed=0",
        "method=qwha seed=1",
        "method=ssh seed=1",
        "method=qwha seed=2",
        "method=ssh seed=2",
    ]


def test_shards_split_the_commands_between_workers(tmp_path, monkeypatch, capsys):
    """``--shard K/N`` runs every N-th command from the K-th: two workers cover the sweep exactly once."""
    monkeypatch.setattr(decisive, "recipe_lr", lambda *a, **k: 1e-4)
    seen = []
    for k in (1, 2):
        decisive.main(
            ["sweep", "--methods", "qwha,cloq", "--data", "gsm8k", "--shard", f"{k}/2", "--dry-run"]
        )
        seen.append([line.split("] ", 1)[1] for line in capsys.readouterr().out.splitlines()])
    full = [
        " ".join(["python -m qwha", *c])
        for c in decisive.sweep_commands("smollm2-135m", 2, ["qwha", "cloq"], ["gsm8k"])
    ]
    assert len(seen[0]) == 3 and len(seen[1]) == 3
    assert sorted(seen[0] + seen[1]) == sorted(full)
    assert seen[0] == full[0::2]


def test_swept_rates_off_the_recipe_stay_one_method(tmp_path, monkeypatch):
    """A swept rate that is not the recipe's makes the run's row label "(old: lr)"; the selection still
    groups it with its method (the preset the run was made with)."""
    recipe = 1e-4
    monkeypatch.setattr(
        render,
        "eval_label",
        lambda res, manifest: (
            res["method_name"] + ("" if res["train_heldout"]["lr"] == recipe else " (old: lr)")
        ),
    )
    cache = StageCache(tmp_path / "c")
    for lr, mean in ((1e-4, 12.0), (7e-4, 9.0)):
        _sweep_record(cache, "qwha", "gsm8k", lr, [mean] * 3)
    found = decisive.heldout_results(render.Runs(cache.root), "smollm2-135m", 2)
    assert set(found) == {("qwha", "gsm8k")} and decisive.select(found[("qwha", "gsm8k")]) == 7e-4


def test_seed_zero_runs_reuse_the_sweeps_init_and_finetune(tmp_path):
    """The seed-0 test run of a swept rate has the sweep run's init and fine-tune keys (only the eval
    differs), so the campaign evaluates it without training again."""
    import subprocess
    import sys

    def keys(args):
        out = subprocess.run(
            [sys.executable, "-m", "qwha", *args, "dry_run=true"],
            capture_output=True,
            text=True,
            check=True,
            cwd=decisive.ROOT,
            env={**__import__("os").environ, "QWHA_CACHE_PATH": str(tmp_path)},
        ).stdout
        return {p[0]: p[1] for p in (line.split() for line in out.splitlines()) if len(p) >= 2}

    sweep = decisive.run_args("smollm2-135m", "qwha", "gsm8k", 2, 6e-4) + list(decisive.SWEEP_EVAL)
    test = decisive.run_args("smollm2-135m", "qwha", "gsm8k", 2, 6e-4, 0)
    a, b = keys(sweep), keys(test)
    assert a["init"] == b["init"] and a["finetune"] == b["finetune"] and a["eval"] != b["eval"]


def test_report_rows_are_each_method_at_its_chosen_rate_on_the_sweeps_build(tmp_path):
    """``report`` keeps, per method, the test-suite runs fine-tuned at the chosen rate on the quantized
    model the sweep used, plus GPTQ alone on it; another rate or another build stays out."""
    cache = StageCache(tmp_path / "c")
    for lr, mean in ((1e-4, 12.0), (3e-4, 9.0)):
        _sweep_record(cache, "qwha", "gsm8k", lr, [mean] * 3)
    for lr, mean in ((1e-4, 10.0), (3e-4, 11.0)):
        _sweep_record(cache, "cloq", "gsm8k", lr, [mean] * 3)

    def test_run(method, lr, correct, build=None):
        _test_eval(cache, method, lr, 0, build, correct)

    test_run("gptq_magr", None, 1)
    test_run("qwha", 3e-4, 5)
    test_run("qwha", 1e-4, 40)  # not the chosen rate
    test_run("cloq", 1e-4, 3)
    test_run("cloq", 1e-4, 45, build="other")  # another quantized model
    text = decisive.report(render.Runs(cache.root), "smollm2-135m", 2)
    rows = [line for line in text.splitlines() if line.startswith("| ") and "method" not in line]
    assert [r.split(" | ")[0] for r in rows] == ["| gptq_magr", "| qwha", "| cloq"]
    assert "1/50" in rows[0] and "5/50" in rows[1] and "3/50" in rows[2]
    assert "| 0.0003 | 0 |" in rows[1] and "| 0.0001 | 0 |" in rows[2]


def test_report_pools_seeds_made_with_the_sweeps_quantizer_and_pairs_them_seed_by_seed(tmp_path):
    """A seed re-draws the calibration windows, so seed 1 quantizes anew: its runs join the rows (the
    quantizer and calibration config match the sweep's but for the seed); a build made with another
    quantizer config stays out, and a newer run of a seed that scored fewer items does not displace the
    seed's full run. With two seeds each, the pooled row says n=3x2 and each seed's paired
    difference (its own build and items) is listed: here CLoQ scores 1 more correct answer at seed 0 and
    the same at seed 1 (hand-worked: +1/3 and 0 of 3 items)."""
    cache = StageCache(tmp_path / "c")

    def build(seed, group_size=64):
        calib = cache.build(
            "calib", f"cal{seed}", lambda out: {}, config={"n": 32, "seed": seed, "length": 512}, upstream={}
        ).key
        return cache.build(
            "quantize",
            f"q{seed}-{group_size}",
            lambda out: {},
            config={"quant": {"bits": 2, "group_size": group_size}},
            upstream={"calib": calib},
        ).key

    sweep_build = build(0)
    for method, lr in (("qwha", 3e-4), ("cloq", 1e-4)):
        _sweep_record(cache, method, "gsm8k", lr, [10.0], quant=sweep_build)

    def test_run(method, lr, seed, correct, quant, tag=""):
        _test_eval(cache, method, lr, seed, quant, correct, tag)

    seed1_build = build(1)
    test_run("qwha", 3e-4, 0, [1, 0, 0], sweep_build)
    test_run("cloq", 1e-4, 0, [1, 1, 0], sweep_build)
    test_run("qwha", 3e-4, 1, [0, 1, 0], seed1_build)
    test_run("cloq", 1e-4, 1, [0, 1, 0], seed1_build)
    test_run("cloq", 1e-4, 2, [1, 1, 1], build(2, group_size=128))  # another quantizer: out
    test_run("cloq", 1e-4, 1, [1], seed1_build, tag="-short")  # newer, fewer items: not the seed's record
    text = decisive.report(render.Runs(cache.root), "smollm2-135m", 2)
    cloq = [line for line in text.splitlines() if line.startswith("| cloq | ")]
    assert len(cloq) == 3  # the pooled row, then one per seed
    assert "| 0.0001 | 0,1 |" in cloq[0] and "n=3×2" in cloq[0]
    per_seed = cloq[1:]
    assert "+33.3" in per_seed[0] and "| cloq | 0 |" in per_seed[0]
    assert "| cloq | 1 | +0.0" in per_seed[1]


def test_report_ranks_the_tuned_methods_and_says_which_pairs_the_items_resolve(tmp_path):
    """Every two tuned methods, paired on the same questions: CLoQ's answer loss is 1 nat above QWHA's
    on every question, so its perplexity is e^2 - e = +4.67 higher with no spread (QWHA better); SSH's
    losses (0.6, 1.5, 0.6, 1.5) average near QWHA's 1.0 and a resample of all-0.6 questions beats it, so
    that pair is not resolved; GPTQ alone is not ranked."""
    cache = StageCache(tmp_path / "c")
    for method in ("qwha", "cloq", "ssh"):
        _sweep_record(cache, method, "gsm8k", 3e-4, [10.0], quant="b0")
    _test_eval(cache, "gptq_magr", None, 0, "b0", [0, 0, 0, 0], nll=[9.0] * 4)
    _test_eval(cache, "qwha", 3e-4, 0, "b0", [0, 0, 0, 0], nll=[1.0] * 4)
    _test_eval(cache, "cloq", 3e-4, 0, "b0", [0, 0, 0, 0], nll=[2.0] * 4)
    _test_eval(cache, "ssh", 3e-4, 0, "b0", [0, 0, 0, 0], nll=[0.6, 1.5, 0.6, 1.5])
    text = decisive.report(render.Runs(cache.root), "smollm2-135m", 2)
    pairs = text.split("Every two tuned methods")[1].splitlines()
    rows = [line for line in pairs if line.startswith("| ") and "first" not in line]
    assert [r.split(" | ")[:2] for r in rows] == [["| qwha", "ssh"], ["| qwha", "cloq"], ["| ssh", "cloq"]]
    assert rows[0].endswith("| cannot tell apart |")
    assert "+4.67 [+4.67, +4.67]" in rows[1] and rows[1].endswith("| qwha better |")
    assert rows[2].endswith("| ssh better |")
    assert "gptq_magr" not in "".join(rows)


def _test_eval(cache: StageCache, method, lr, seed, quant, correct, tag="", nll=None):
    """A test-suite eval artifact on quantized build ``quant``, fine-tuned at ``lr`` (None: GPTQ alone).
    ``correct``: a count of 50 (aggregates only) or a list of 0/1 per question (per-item records too);
    ``nll``: each question's answer loss (one token each; default 1.0)."""
    name = f"{method}-{lr}-{seed}-{quant}{tag}"
    ft = None
    if lr is not None:
        ft = cache.build("finetune", name, lambda out: {}, config={"train": {"lr": lr}}, upstream={}).key
    items = correct if isinstance(correct, list) else None
    k, n = (sum(items), len(items)) if items is not None else (correct, 50)
    upstream = {k: v for k, v in (("quantize", quant), ("finetune", ft)) if v}
    res = {
        **_result_head(method, "gsm8k", seed),
        "gsm8k": {"exact_match": k / n, "correct": k, "n": n},
        "upstream": upstream,
        **({"records": {"gsm8k": records_file("gsm8k")}} if items is not None else {}),
    }

    def fn(out):
        if items is not None:
            write_records(
                out / records_file("gsm8k"),
                [
                    {"id": i, "correct": bool(c), "nll": 1.0 if nll is None else nll[i], "tokens": 1}
                    for i, c in enumerate(items)
                ],
            )
        (out / "results.json").write_text(json.dumps(res))
        return {}

    cache.build("eval", f"t-{name}", fn, config={"k": name}, upstream=upstream)


def test_a_diverged_rate_is_never_chosen():
    """A rate whose fine-tune diverged (NaN or infinite held-out loss) ranks last: ``min`` over NaN keys
    would otherwise return whichever rate it met first."""

    def res(nll):
        return {"train_heldout": {"nll": nll}}

    nan, inf = float("nan"), float("inf")
    assert decisive.select({5e-3: res(nan), 1e-4: res(3.0), 3e-4: res(2.5)}) == 3e-4
    assert decisive.select({1e-4: res(3.0), 5e-3: res(nan), 3e-4: res(2.5)}) == 3e-4
    assert decisive.select({5e-3: res(inf), 1e-4: res(3.0)}) == 1e-4
    # a method whose every rate diverged never becomes the best baseline
    found = {
        ("qlora", "alpaca"): {1e-3: res(nan), 3e-3: res(nan)},
        ("cloq", "alpaca"): {1e-4: res(4.0)},
        ("qwha", "alpaca"): {1e-4: res(3.0)},
    }
    assert decisive.best_baseline(found, "alpaca") == "cloq"


def _csqa_eval(cache: StageCache, method, lr, quant, correct: dict[str, list[int]], choices: dict[str, int]):
    """A CSQA test eval artifact (Alpaca-style run) with per-document records: ``correct[task]`` is 0/1
    per document, each of whose ``choices[task]`` choices has a log-likelihood."""
    name = f"csqa-{method}-{lr}-{quant}"
    ft = cache.build("finetune", name, lambda out: {}, config={"train": {"lr": lr}}, upstream={}).key
    upstream = {"quantize": quant, "finetune": ft}
    tasks = {t: {"metric": "acc", "value": sum(c) / len(c), "n": len(c)} for t, c in correct.items()}
    res = {
        **_result_head(method, "alpaca", 0),
        "csqa": {"tasks": tasks, "average": sum(v["value"] for v in tasks.values()) / len(tasks)},
        "upstream": upstream,
        "records": {"csqa": records_file("csqa")},
    }

    def fn(out):
        write_records(
            out / records_file("csqa"),
            [
                {"task": t, "doc_id": i, "gold": 0, "ll": [-1.0] * choices[t], "correct": c}
                for t, cs in correct.items()
                for i, c in enumerate(cs)
            ],
        )
        (out / "results.json").write_text(json.dumps(res))
        return {}

    cache.build("eval", f"t-{name}", fn, config={"k": name}, upstream=upstream)


def test_report_breaks_csqa_down_by_task_beside_a_uniform_guess(tmp_path):
    """Alpaca-style rows: per task, each method's k/n, its paired difference to QWHA on the task's
    documents, and the uniform guess on the same documents (hand-worked: ARC-Easy's 4 documents of 4
    choices guess 25.0 %, PIQA's 2 of 2 choices 50.0 %, average 37.5 %; CLoQ gets one more ARC-Easy
    document right, +25.0 points, and the same PIQA documents, +0.0 with no spread)."""
    cache = StageCache(tmp_path / "c")
    for method in ("qwha", "cloq"):
        _sweep_record(cache, method, "alpaca", 3e-4, [10.0], quant="b0")
    choices = {"arc_easy": 4, "piqa": 2}
    _csqa_eval(cache, "qwha", 3e-4, "b0", {"arc_easy": [1, 1, 0, 0], "piqa": [1, 0]}, choices)
    _csqa_eval(cache, "cloq", 3e-4, "b0", {"arc_easy": [1, 1, 1, 0], "piqa": [1, 0]}, choices)
    text = decisive.report(render.Runs(cache.root), "smollm2-135m", 2)
    part = text.split("## alpaca-style fine-tuning")[1].split("Per task")[1]
    lines = {
        line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in part.splitlines() if line.startswith("| ")
    }
    assert lines["row"][:2] == ["arc_easy", "piqa"]
    assert "2/4" in lines["qwha"][0] and "3/4" in lines["cloq"][0] and "1/2" in lines["cloq"][1]
    assert lines["Δ cloq − qwha"][0].startswith("+25.0 [") and "n=4" in lines["Δ cloq − qwha"][0]
    assert lines["Δ cloq − qwha"][1].startswith("+0.0 [+0.0, +0.0] n=2")
    assert lines["uniform guess"] == ["25.0", "50.0", "37.5 |"]
