"""File layout of each artifact: what a stage writes and how the next one reads it.

Stages never import each other; they agree on these names.

    base/<key>/      base_model.json (+ model/ for a converted GGUF)       -> qwha.models.base_model_ref
    calib/<key>/     calib.pt  [n, length] token ids                        -> load_calibration
    quantize/<key>/  model/ (GPTQModel format, or a copy of fp weights for quant=none), quant.json
    init/<key>/      adapter/ (PEFT format), report.json
    finetune/<key>/  adapter/ (PEFT format), metrics.jsonl
    eval/<key>/      results.json
"""

from __future__ import annotations

from pathlib import Path

import torch

CALIB_FILE = "calib.pt"
MODEL_DIR = "model"
QUANT_INFO = "quant.json"
ADAPTER_DIR = "adapter"
INIT_REPORT = "report.json"
RESULTS = "results.json"


def save_calibration(windows: torch.Tensor, out: Path) -> None:
    torch.save(windows.clone(), Path(out) / CALIB_FILE)


def load_calibration(artifact_path: Path) -> torch.Tensor:
    """The [n, length] LongTensor of a `calib` artifact."""
    return torch.load(Path(artifact_path) / CALIB_FILE, weights_only=True)
