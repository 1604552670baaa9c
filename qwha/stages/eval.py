"""Stage `eval`: not implemented yet (issue #7). It refuses to run instead of writing a fake artifact."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from qwha.stages import StageNotReady


def upstream(cfg: DictConfig) -> list[str]:
    chain = ["base", "quantize", "init", "finetune"]
    return chain[: chain.index(cfg.eval.target) + 1]


def key_config(cfg: DictConfig) -> dict:
    # `auto` switches resolve against the fine-tuning data format, so they are part of the key.
    return {"eval": cfg.eval, "data_format": cfg.data.format, "data_source": cfg.data.source}


def run(cfg: DictConfig, out: Path, inputs: dict) -> dict:
    raise StageNotReady("stage 'eval' is not implemented yet (issue #7); no artifact was written")
