"""Training checkpoints: ``<dir>/step-N/`` holding the trainable weights and everything needed to resume.

A checkpoint is written into a hidden temporary folder and renamed to ``step-N`` (atomic on one file
system), so a folder named ``step-N`` is always complete; a kill mid-write leaves only a ``.tmp-*`` folder,
removed on the next start. Files:

    trainable.safetensors   the parameters with requires_grad=True, by name (the adapter)
    optimizer.pt            AdamW state
    state.pt                step, scheduler, RNG states, run fingerprint, loss summary
    metrics.jsonl           the metrics lines up to this step (copied into a resumed run's artifact)
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

_STEP = re.compile(r"^step-(\d+)$")


def list_checkpoints(folder: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints as (step, path), oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    out = []
    for p in folder.iterdir():
        m = _STEP.match(p.name)
        if m and (p / "state.pt").is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    ckpts = list_checkpoints(folder)
    return ckpts[-1][1] if ckpts else None


def clean_partial(folder: str | Path) -> None:
    """Remove temporary folders left by a kill during a save."""
    folder = Path(folder)
    if folder.is_dir():
        for p in folder.glob(".tmp-step-*"):
            shutil.rmtree(p, ignore_errors=True)


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),  # noqa: NPY002 - the global generator other code may use
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    folder: str | Path,
    step: int,
    trainable: dict[str, torch.Tensor],
    optimizer_state: dict,
    state: dict,
    metrics_file: Path | None = None,
    keep_last: int = 2,
) -> Path:
    """Write ``folder/step-<step>/`` atomically and prune to the ``keep_last`` newest (0: keep all)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".tmp-step-{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in trainable.items()}
    save_file(tensors, str(tmp / "trainable.safetensors"))
    torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save({**state, "step": step, "rng": rng_state()}, tmp / "state.pt")
    if metrics_file is not None and metrics_file.is_file():
        shutil.copyfile(metrics_file, tmp / "metrics.jsonl")
    final = folder / f"step-{step}"
    if final.exists():  # the same step saved again (a resumed run that re-reached it): replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    if keep_last > 0:
        for _, old in list_checkpoints(folder)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(trainable tensors on CPU, optimizer state, trainer state) of a checkpoint folder."""
    path = Path(path)
    trainable = load_file(str(path / "trainable.safetensors"))
    optimizer_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False)
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    return trainable, optimizer_state, state


def read_metrics(path: str | Path) -> list[dict]:
    """The metrics lines saved with a checkpoint (empty if none)."""
    f = Path(path) / "metrics.jsonl"
    if not f.is_file():
        return []
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
