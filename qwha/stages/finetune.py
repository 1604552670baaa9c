"""Stage `finetune`: not implemented yet (issue #6). It refuses to run instead of writing a fake artifact."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from qwha.stages import StageNotReady

# Keys that change how a run is observed or resumed, never its result.
NOT_IN_KEY = ("save_every", "resume", "log_every", "wandb")


def upstream(cfg: DictConfig) -> list[str]:
    return ["base", "quantize", "init"]


def key_config(cfg: DictConfig) -> dict:
    train = {k: v for k, v in cfg.train.items() if k not in NOT_IN_KEY}
    return {"data": cfg.data, "train": train, "seed": cfg.seed}


def run(cfg: DictConfig, out: Path, inputs: dict) -> dict:
    raise StageNotReady("stage 'finetune' is not implemented yet (issue #6); no artifact was written")
