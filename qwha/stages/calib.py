"""Stage `calib`: the calibration sample (n windows x length tokens) shared by quantize and init."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from qwha.stages import StageNotReady


def upstream(cfg: DictConfig) -> list[str]:
    return ["base"]


def key_config(cfg: DictConfig) -> dict:
    c = cfg.calib
    return {"source": c.source, "n": c.n, "length": c.length, "seed": c.seed}


def run(cfg: DictConfig, out: Path, inputs: dict) -> dict:
    raise StageNotReady("stage 'calib' is not implemented yet (issue #4); no artifact was written")
