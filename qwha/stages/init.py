"""Stage `init`: not implemented yet (issue #5). It refuses to run instead of writing a fake artifact."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from qwha.stages import StageNotReady


def upstream(cfg: DictConfig) -> list[str]:
    return ["base", "calib", "quantize"]


def key_config(cfg: DictConfig) -> dict:
    return {"adapter": cfg.adapter, "init": cfg.init, "seed": cfg.seed}


def run(cfg: DictConfig, out: Path, inputs: dict) -> dict:
    raise StageNotReady("stage 'init' is not implemented yet (issue #5); no artifact was written")
