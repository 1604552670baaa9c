"""The entry point: help, composed configs, the brief's shorthand, bad input, dry runs, sweeps."""

from __future__ import annotations

import pytest

from tests.conftest import compose, run_cli


def test_help_lists_groups_and_usage():
    res = run_cli("--help")
    assert res.returncode == 0
    assert "python -m qwha stage=init model=llama3.2-3b bits=2" in res.stdout
    for group in ("adapter:", "init:", "model:", "quant:", "data:", "train:", "eval:"):
        assert group in res.stdout
    assert "smollm2-135m" in res.stdout and "llama3.1-8b" in res.stdout


def test_cfg_job_and_brief_shorthand():
    res = run_cli("stage=init", "model=llama3.2-3b", "bits=2", "--cfg", "job", "--resolve")
    assert res.returncode == 0, res.stderr
    assert "id: meta-llama/Llama-3.2-3B" in res.stdout
    cfg = compose("stage=init", "model=llama3.2-3b", "bits=2")
    assert cfg.quant.bits == 2 and cfg.quant.group_size == cfg.group_size == 64
    assert cfg.adapter.rank == cfg.rank == 64
    # the paper's learning rate for (Llama-3.2-3B, GSM8K, 2-bit)
    assert cfg.train.lr == pytest.approx(2e-4)
    assert compose("model=mistral-7b-v0.3", "bits=3", "data=alpaca").train.lr == pytest.approx(5e-6)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["model=gpt5"], "model='gpt5' is unknown: allowed values are hf, llama3.1-8b"),
        (
            ["stage=train"],
            "stage='train' is unknown: allowed values are quantize, init, finetune, eval, export, all",
        ),
        (["adapter=dora"], "adapter='dora' is unknown: allowed values are dca, dct2d"),
        (["bits=5"], "bits=5 is not supported: allowed values are 2, 3, 4, 8"),
        (["group_size=100"], "group_size=100 does not divide the smollm2-135m layer width(s) 576, 1536"),
        (["rank=0"], "rank=0 must be a positive integer"),
        (["init=cloq"], "init=cloq (lowrank) does not fit adapter.method='wha': use adapter=lora"),
        (["model=hf"], "model.id is required with model=hf"),
    ],
)
def test_bad_input_fails_fast_with_one_line(args, needle, tmp_path):
    res = run_cli(*args, env={"QWHA_CACHE_PATH": str(tmp_path / "c")})
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert needle in lines[0]
    assert not (tmp_path / "c").exists()  # failed before touching anything


def test_unwritable_cache_root(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")  # a file where the root should be: unwritable even for root
    res = run_cli("dry_run=true", f"cache_dir={blocker / 'cache'}")
    assert res.returncode == 2
    assert len(res.stderr.strip().splitlines()) == 1
    assert "is not writable" in res.stderr and "cache_dir=" in res.stderr


def test_dry_run_prints_keys_and_multirun_sweeps(tmp_path):
    env = {"QWHA_CACHE_PATH": str(tmp_path / "c")}
    res = run_cli("dry_run=true", env=env)
    assert res.returncode == 0, res.stderr
    names = [line.split()[0] for line in res.stdout.splitlines()]
    assert names == ["base", "calib", "quantize", "init", "finetune", "eval"]
    sweep = run_cli(
        "-m", "dry_run=true", "stage=quantize", "bits=2,3", f"hydra.sweep.dir={tmp_path}/m", env=env
    )
    assert sweep.returncode == 0, sweep.stderr
    quant_keys = {line.split()[1] for line in sweep.stdout.splitlines() if line.startswith("quantize")}
    assert len(quant_keys) == 2
    joblib = run_cli(
        "-m",
        "hydra/launcher=local_joblib",
        "dry_run=true",
        "stage=quantize",
        "bits=2,3",
        f"hydra.sweep.dir={tmp_path}/j",
        env=env,
    )
    assert joblib.returncode == 0, joblib.stderr


def test_slurm_launcher_config_composes():
    res = run_cli("hydra/launcher=slurm", "--cfg", "hydra", "--package", "hydra.launcher")
    assert res.returncode == 0, res.stderr
    assert "submitit" in res.stdout and "gpus_per_node: 1" in res.stdout
