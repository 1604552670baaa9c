"""Stage `quantize`: not implemented yet (issue #4). It refuses to run instead of writing a fake artifact."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from qwha.stages import StageNotReady


def upstream(cfg: DictConfig) -> list[str]:
    return ["base", "calib"] if cfg.quant.method in ("gptq", "magr_gptq") else ["base"]


def key_config(cfg: DictConfig) -> dict:
    return {"quant": cfg.quant}


def run(cfg: DictConfig, out: Path, inputs: dict) -> dict:
    raise StageNotReady("stage 'quantize' is not implemented yet (issue #4); no artifact was written")
