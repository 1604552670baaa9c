"""Stage `base`: the full-precision model as an artifact (GGUF conversion, or a hub reference)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from qwha.models import materialize_base


def upstream(cfg: DictConfig) -> list[str]:
    return []


def key_config(cfg: DictConfig) -> dict:
    m = cfg.model
    return {"id": str(m.id), "source": str(m.source), "gguf_package": m.gguf_package}


def run(cfg: DictConfig, out: Path, inputs: dict) -> dict:
    return materialize_base(cfg.model, out)
