"""The init stage computes the calibration Grams once per (base, calib, targets, dtype) in a process."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from qwha.stages import init as init_stage
from tests.conftest import compose


def _inputs(calib_key: str) -> dict:
    return {"base": SimpleNamespace(key="b0"), "calib": SimpleNamespace(key=calib_key)}


def test_grams_reused_across_inits_and_recomputed_for_new_calibration(monkeypatch):
    calls = []

    def fake(cfg, inputs, targets):
        calls.append(inputs["calib"].key)
        return {"m": torch.ones(4, 4, dtype=torch.float64)}, {"m": torch.ones(2, 4)}, 8

    monkeypatch.setattr(init_stage, "_compute_grams", fake)
    monkeypatch.setattr(init_stage, "_GRAM_MEMO", {})
    targets = ["q_proj"]
    a = init_stage.full_precision_grams(compose("init=qwha", "bits=4"), _inputs("c1"), targets)
    b = init_stage.full_precision_grams(compose("init=random", "bits=2"), _inputs("c1"), targets)
    assert calls == ["c1"] and b is a  # another init and other bits: same Grams
    init_stage.full_precision_grams(compose("init=qwha"), _inputs("c2"), targets)
    init_stage.full_precision_grams(compose("init=qwha"), _inputs("c2"), ["q_proj", "v_proj"])
    assert calls == ["c1", "c2", "c2"]  # a new sample or target list recomputes


def test_memo_skipped_above_size_limit(monkeypatch):
    calls = []

    def fake(cfg, inputs, targets):
        calls.append(1)
        return {"m": torch.ones(64, 64, dtype=torch.float64)}, {}, 8

    monkeypatch.setattr(init_stage, "_compute_grams", fake)
    monkeypatch.setattr(init_stage, "_GRAM_MEMO", {})
    monkeypatch.setenv("QWHA_GRAM_MEMO_GB", str(1000 / 2**30))  # 1000 bytes < 64·64·8
    for _ in range(2):
        init_stage.full_precision_grams(compose("init=qwha"), _inputs("c1"), ["q_proj"])
    assert calls == [1, 1]


def test_init_key_includes_perplexity_settings():
    a = init_stage.key_config(compose("init=qwha"))
    b = init_stage.key_config(compose("init=qwha", "eval.perplexity.max_tokens=1024"))
    assert a != b
