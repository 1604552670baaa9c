"""The one real-model end-to-end test: SmolLM2-135M, offline, quantize -> init -> finetune -> eval.

Settings are cut down to keep it within a few minutes on 2 CPU cores (8 calibration windows of 256
tokens, 10 MagR iterations, rank 8, 4 optimizer steps on the same 8 examples, 2 GSM8K questions). The full
default runs with `make run`.
"""

from __future__ import annotations

import json
import math

import pytest

from qwha.cache import StageCache
from qwha.pipeline import run_stage
from tests.conftest import compose

pytestmark = pytest.mark.e2e

SMALL = [
    "calib.n=8",
    "calib.length=256",
    "quant.magr_iters=10",
    "rank=8",
    "train.max_steps=4",
    "train.effective_batch=8",
    "train.micro_batch_size=4",
    "data.max_length=128",
    "data.packaged_size=8",  # every step sees the same 8 examples: the loss must fall
    "model.eval_limit=2",
    "model.ppl_max_tokens=1024",
    "eval.perplexity.window=512",
    "eval.perplexity.stride=256",
    "eval.gsm8k.max_new_tokens=32",
]


def test_embedded_pipeline_end_to_end(tmp_path):
    cache = StageCache(tmp_path / "cache")
    cfg = compose("stage=all", f"cache_dir={cache.root}", *SMALL)
    done = run_stage(cfg, cache)
    assert list(done) == ["base", "calib", "quantize", "init", "finetune", "eval"]
    assert not any(hit for _, hit in done.values())

    quant = done["quantize"][0]
    q = quant.metrics
    assert (quant.path / "model" / "quantize_config.json").is_file()
    assert q["summary"]["heldout_ppl"] > 1.0
    # every adapted projection of the 30 blocks was quantized and measured
    assert len(q["layers"]) == 30 * 7

    init = done["init"][0]
    report = json.loads((init.path / "report.json").read_text())
    assert len(report["layers"]) == 30 * 7
    # AdaAlloc + refinement removes part of every layer's output error (relative error < 1 = zero init)
    assert all(row["relative"] < 1.0 for row in report["layers"].values())
    assert (init.path / "adapter" / "adapter_config.json").is_file()

    ft = done["finetune"][0].metrics
    assert ft["steps"] == 4
    assert ft["final_loss"] < ft["first_loss"], (ft["first_loss"], ft["final_loss"])

    results = json.loads((done["eval"][0].path / "results.json").read_text())
    assert results["gsm8k"]["n"] == 2 and 0.0 <= results["gsm8k"]["exact_match"] <= 1.0
    # the reference solutions' loss on the same 2 questions (this 2-bit, 4-step model is near uniform)
    nll = results["gsm8k"]["answer_nll"]
    assert nll["n"] == 2 and nll["tokens"] > 50 and 0.0 < nll["nll"] < 20.0
    assert nll["ppl"] == pytest.approx(math.exp(nll["nll"]))
    assert results["perplexity"]["tokens"] > 0

    # a second run is all cache hits, checksums verified
    again = run_stage(cfg, cache)
    assert all(hit for _, hit in again.values())
