"""Training checkpoints: ``<dir>/step-N/`` holding the trainable weights and everything needed to resume.

A checkpoint is written into a hidden temporary folder and renamed to ``step-N`` (atomic on one file
system), so a folder named ``step-N`` is always complete; a kill mid-write leaves only a ``.tmp-*`` folder,
removed on the next start. Files:

    trainable.safetensors   the parameters with requires_grad=True, by name (the adapter)
    optimizer.pt            AdamW state
    state.pt                step, scheduler, RNG states, run fingerprint, loss summary
    metrics.jsonl           the metrics lines up to this step (copied into a resumed run's artifact)
    checksums.json          SHA-256 of each file above, written last

On resume, the newest checkpoint whose files match ``checksums.json`` is used: a damaged one (a disk
error, a bad copy) is reported and skipped, and the run resumes from the one before it (or from step 0).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

_STEP = re.compile(r"^step-(\d+)$")
CHECKSUMS = "checksums.json"
log = logging.getLogger("qwha.finetune")


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


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _file_sums(folder: Path) -> dict[str, str]:
    return {p.name: _sha256(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != CHECKSUMS}


def verify_checkpoint(path: str | Path) -> list[str]:
    """Files of a checkpoint that are missing, extra or differ from its ``checksums.json`` (empty: intact).
    A checkpoint written before checksums existed (no ``checksums.json``) is taken as it is."""
    path = Path(path)
    sums_file = path / CHECKSUMS
    if not sums_file.is_file():
        return []
    try:
        expected = json.loads(sums_file.read_text())
    except (OSError, ValueError):
        return [CHECKSUMS]
    actual = _file_sums(path)
    bad = [name for name, digest in expected.items() if actual.get(name) != digest]
    return sorted(bad + [name for name in actual if name not in expected])


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The newest complete checkpoint whose files match their checksums, or None. Damaged ones are
    reported and skipped (left in place: a later save of the same step replaces them)."""
    for _, path in reversed(list_checkpoints(folder)):
        bad = verify_checkpoint(path)
        if not bad:
            return path
        log.warning(
            "checkpoint %s failed its checksums (%s); resuming from an earlier one", path, ", ".join(bad[:5])
        )
    return None


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
    (tmp / CHECKSUMS).write_text(json.dumps(_file_sums(tmp), sort_keys=True))
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
