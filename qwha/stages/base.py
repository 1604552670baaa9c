"""Stage `base`: the full-precision model as an artifact (GGUF conversion, hub or local-folder reference)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from qwha.models import base_key_config, materialize_base


def upstream(cfg: DictConfig) -> list[str]:
    return []


def key_config(cfg: DictConfig) -> dict:
    # gguf: the package; hub: id + model.revision (the manifest records the commit it resolved to);
    # local folder: a fingerprint of its files.
    return base_key_config(cfg.model)


def run(cfg: DictConfig, out: Path, inputs: dict) -> dict:
    return materialize_base(cfg.model, out)
