"""Quantization-aware adapter initialization (docs/method.md §2): AdaAlloc, selection, refinement, baselines.

Public entry points: `initialize_layer` (QWHA's init of one layer), `initialize` (every init of
the ablations, by name), `calibration_grams` (the `XXᵀ` of every adapted linear) and the metrics
of `qwha.init.metrics`.
"""

from qwha.init.hessian import calibration_grams, damped_gram
from qwha.init.methods import LOWRANK_METHODS, METHODS, SPARSE_METHODS, initialize, initialize_layer
from qwha.init.metrics import dense_update, layer_error, normalized_rank, outlier_coverage, output_error

__all__ = [
    "METHODS",
    "SPARSE_METHODS",
    "LOWRANK_METHODS",
    "initialize",
    "initialize_layer",
    "calibration_grams",
    "damped_gram",
    "dense_update",
    "layer_error",
    "normalized_rank",
    "outlier_coverage",
    "output_error",
]
