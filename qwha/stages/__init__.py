"""The pipeline's stages, each a module with the same three functions.

    upstream(cfg) -> list[str]          names of the stages whose artifacts it consumes
    key_config(cfg) -> dict             the configuration that affects its result (hashed into the key)
    run(cfg, out: Path, inputs: dict[str, Artifact]) -> dict
                                        writes the artifact into `out`, returns metrics for the manifest

Stages never import each other; they meet through artifacts (paths). Internal stages: `base` (the model
weights), `calib` (the shared calibration sample). User-facing: quantize, init, finetune, eval, and
`export` (the tuned model as a folder other tools load; run on request, not part of ``stage=all``).
"""

from __future__ import annotations

import importlib
from types import ModuleType

PIPELINE = ("quantize", "init", "finetune", "eval")
ALL_STAGES = ("base", "calib", *PIPELINE, "export")
_MODULES = {
    "base": "qwha.stages.base",
    "calib": "qwha.stages.calib",
    "quantize": "qwha.stages.quantize",
    "init": "qwha.stages.init",
    "finetune": "qwha.stages.finetune",
    "eval": "qwha.stages.eval",
    "export": "qwha.stages.export",
}


class StageNotReady(RuntimeError):
    """A stage whose implementation has not landed: it refuses to run rather than fake an artifact."""


def get_stage(name: str) -> ModuleType:
    return importlib.import_module(_MODULES[name])
